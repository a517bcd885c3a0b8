"""Inversions: image latents -> noise, and back.

DDIM inversion (baselines.md §2): deterministic DDIM up an explicit grid with the source prompt at w = 0, noise
evaluated at each step's starting point, from z0 at t = 0 (or from x_19 with explicit noise, iCD style).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from icd.models.base import Cond, LatentDiffusion
from icd.sampling import guided_eps
from icd.schedule import ddim_grid
from icd.solver import ddim_loop


@dataclass
class Inversion:
    """The result of inverting a batch: the noise latent and every visited latent, with the timesteps."""

    latents: list[torch.Tensor]  # latents[k] is at timesteps[k]; latents[-1] is the final noise
    timesteps: list[int]
    prompts: list[str]
    method: str

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]


@torch.no_grad()
def ddim_invert(model: LatentDiffusion, z0: torch.Tensor, cond: Cond, prompts: list[str], *, steps: int = 50
                ) -> Inversion:
    """Unguided DDIM inversion 0 -> g_0 -> ... -> g_{n-1} (n = `steps` UNet calls)."""
    timesteps = [0, *ddim_grid(steps)]
    _, visited = ddim_loop(lambda x, t: model.eps(x, t, cond), z0, timesteps, model.schedule)
    return Inversion(latents=visited, timesteps=timesteps, prompts=list(prompts), method="ddim")


@torch.no_grad()
def ddim_decode(model: LatentDiffusion, inversion: Inversion, cond: Cond, *, guidance: float = 0.0,
                tau: float | None = None) -> torch.Tensor:
    """DDIM from the inversion's noise back down its own grid to t = 0; returns clean latents."""
    timesteps = list(reversed(inversion.timesteps))
    z0, _ = ddim_loop(guided_eps(model, cond, guidance, tau), inversion.noise, timesteps, model.schedule)
    return z0
