"""The DDIM baselines (docs/baselines.md §1-2): ``ddim`` (DDIM inversion and decoding on the original UNet,
two-pass classifier-free guidance) and ``gddim`` (the same on the guidance-distilled UNet, adapters off: guidance
is an input, one call per step)."""

from __future__ import annotations

import torch

from icd.editing.inversion import Inversion
from icd.methods.base import Host, Method, Settings
from icd.models.base import LatentDiffusion
from icd.samplers import StopFn, ddim_invert, stoppable


class DDIM(Method):
    def schedule(self, model: LatentDiffusion):
        """The model's schedule as its scheduler config runs DDIM: its end points (``set_alpha_to_one``) and grid
        spacing, as the Prompt-to-Prompt / null-text reference code (docs/baselines.md §2.1)."""
        return model.schedule.configured()

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        """Unguided DDIM inversion up the grid of `st.steps` (`ddim_rule`: the noise's timestep label)."""
        cond = model.encode_prompt(prompts)
        timesteps, latents = ddim_invert(stoppable(self.encoder_eps(model), should_stop), z0, cond, steps=st.steps,
                                         schedule=self.schedule(model), rule=ddim_rule)
        return Inversion(latents=latents, timesteps=timesteps, prompts=prompts, method=self.name,
                         settings={"ddim_rule": ddim_rule})


class GuidedDDIM(DDIM):
    unet = "distilled"
