"""``nti``: null-text inversion (Mokady et al. 2023; docs/baselines.md §4): DDIM inversion, then per-step
unconditional embeddings optimised so that guided DDIM retraces it (`icd.editing.nulltext`); the edit's
classifier-free guidance runs against them."""

from __future__ import annotations

from dataclasses import replace

import torch

from icd.editing.inversion import Inversion
from icd.editing.nulltext import null_text_optimize
from icd.methods.base import Host, Settings, with_extra
from icd.methods.ddim import DDIM
from icd.models.base import Cond, LatentDiffusion
from icd.samplers import StopFn


class NTI(DDIM):
    p2p_defaults = dict(cross_replace=0.4, self_replace=0.8, reweight_new_words=3.0)  # the NTI paper's

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        """DDIM inversion, then the null-text optimisation at `guidance` (default: the edit's default code)."""
        inv = super().invert(host, model, z0, prompts, st=st, guidance=guidance, ddim_rule=ddim_rule,
                             progress=progress, should_stop=should_stop)
        w = self.guidance_default(host, "edit") if guidance is None else guidance
        inv.null_embeddings = null_text_optimize(model, inv, model.encode_prompt(prompts), guidance=w,
                                                 progress=progress, should_stop=should_stop,
                                                 schedule=self.schedule(model))
        inv.settings["guidance"] = w
        return inv

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (guidance,)  # the null-text optimisation's CFG code

    def run_settings(self, st: Settings, inversion: Inversion) -> Settings:
        """`st` with DDIM's rule and the null-text optimisation's CFG code."""
        return with_extra(st, ddim_rule=inversion.settings.get("ddim_rule"),
                          null_text_guidance=inversion.settings.get("guidance"))

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        if inversion.null_embeddings is None:
            raise ValueError("this inversion has no null-text embeddings (invert with method='nti')")
        super().check_inversion(model, inversion)

    def uncond(self, model: LatentDiffusion, inversion: Inversion, cond_src: Cond, rows: torch.Tensor):
        """The per-step optimised token embeddings (a function of the timestep); SDXL's pooled embedding stays the
        empty prompt's."""
        steps = list(reversed(inversion.timesteps))
        empty = model.empty_cond(len(rows))
        return lambda t: replace(empty, tokens=inversion.null_embeddings[steps.index(t)][rows])
