"""Range checks of a run's options and prompts, shared by every method of `icd.pipeline` (moved out of it to keep
the pipeline within its size budget; `icd.pipeline` re-exports them)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from icd.models.base import LatentDiffusion, PromptError

__all__ = ["MAX_GUIDANCE", "check_prompts", "check_ranges"]

MAX_GUIDANCE = 100.0  # codes above this are a typo, not a setting (CFG 8 is w = 7)


def check_ranges(*, guidance: float | None, tau: float | None, steps: int | None, max_steps: int) -> None:
    """ValueError naming the option for a guidance code, tau or step count no run can use."""
    if guidance is not None and not (math.isfinite(guidance) and 0.0 <= guidance <= MAX_GUIDANCE):
        raise ValueError(f"guidance (--guidance) must be a code w = CFG - 1 in [0, {MAX_GUIDANCE:g}], got {guidance}")
    if tau is not None and not (math.isfinite(tau) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau (--tau) must lie in [0, 1], got {tau}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps):
        raise ValueError(f"steps (--steps) must be an integer in 1..{max_steps}, got {steps}")


def check_prompts(model: LatentDiffusion, prompts: Sequence[str]) -> None:
    """PromptError for an empty prompt or one the model cannot read."""
    for p in prompts:
        if not p.strip():
            raise PromptError("a prompt is empty")
    model.check_prompts(prompts)
