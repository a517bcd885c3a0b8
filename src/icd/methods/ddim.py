"""The DDIM baselines (docs/baselines.md §1-2): ``ddim`` (DDIM inversion and decoding on the original UNet,
two-pass classifier-free guidance) and ``gddim`` (the same on the guidance-distilled UNet, adapters off: guidance
is an input, one call per step). Inversion and decoding are `Method`'s defaults (`Method.invert`: unguided DDIM
inversion up the grid of the step count, the noise labelled by the DDIM rule; `Method.decode`)."""

from __future__ import annotations

from icd.methods.base import Method
from icd.models.base import LatentDiffusion


class DDIM(Method):
    def schedule(self, model: LatentDiffusion):
        """The model's schedule as its scheduler config runs DDIM: its end points (``set_alpha_to_one``) and grid
        spacing, as the Prompt-to-Prompt / null-text reference code (docs/baselines.md §2.1)."""
        return model.schedule.configured()


class GuidedDDIM(DDIM):
    unet = "distilled"
