"""A rectified-flow latent model behind the one calling convention (docs/flow.md §1, §4).

A flow transformer predicts the velocity v = d x_s / d s of the path x_s = (1 - s) x0 + s eps. `FlowDiffusion`
hands it out as the same `EpsFn` every sampler, loss and editor sees, through the exact conversion

    eps_hat = x_s + (1 - s) v        (x0_hat = x_s - s v; `icd.schedule.velocity_to_eps`)

on the integer time grid of `icd.schedule.DiscreteFlowSchedule` (s_t: FLUX's shifted grid). The DDIM jump of that
epsilon on that schedule is the Euler step of the flow ODE (`icd.solver.euler_step`), so DDIM inversion is flow ODE
inversion, the iCD consistency function is the flow one, and classifier-free guidance is the same linear combination
(an affine map of v at fixed (x, s) commutes with it). The epsilon is returned in float64: near the top of the grid
(alpha = 1 - s = 1e-5) the jump divides by alpha.

A family subclasses `FlowDiffusion` and implements `velocity` (its transformer's inputs: packing, position ids) and
`encode_prompt`; the network is still the model's ``unet`` attribute (the denoiser, here a transformer), so
adapters, the NFE counter and `with_unet` work unchanged.
"""

from __future__ import annotations

import torch

from icd.models.base import Cond, LatentDiffusion
from icd.schedule import DiscreteFlowSchedule


class FlowDiffusion(LatentDiffusion):
    """A latent rectified-flow model (velocity prediction) seen as epsilon prediction (module docstring)."""

    kind = "flow"
    schedule: DiscreteFlowSchedule

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: Cond, *, guidance: torch.Tensor | None
                 ) -> torch.Tensor:
        """v_theta(x_s, s, c[, g]) on latents [B, C, h, w] at noise levels `s` [B] (float64, on x's device);
        `guidance`: the embedded guidance scale [B] of a guidance-distilled transformer, else None."""
        raise NotImplementedError(f"{type(self).__name__}.velocity")

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        height, width = height or self.image_size, width or self.image_size
        return (int(self.vae.config.latent_channels), height // self.vae_factor, width // self.vae_factor)

    @property
    def guidance_distilled(self) -> bool:
        """True when the transformer embeds a guidance scale (FLUX.1-dev's ``guidance_embeds``)."""
        return bool(getattr(self.unet.config, "guidance_embeds", False))

    def guidance_scale(self, w: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
        """The embedded guidance input of code w: the scale 1 + w (FLUX.1-dev's ``guidance``), [n] float32."""
        return (1.0 + torch.as_tensor(w, dtype=torch.float32)).expand(n).to(device)

    def _levels(self, t: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """s_t as an [n] float64 device tensor (integers cached: no host-to-device copy per call). float64: the
        epsilon's 1 - s_t is 1e-5 at the top, where float32 would be 0.14 % off."""
        if isinstance(t, torch.Tensor):
            s = self.schedule.noise_level(t).to(device)
            return s.expand(n) if s.ndim == 0 else s
        key = ("s", int(t), n, device)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._cache(key, self.schedule.noise_level(int(t)).expand(n).to(device))
        return cached

    def _unet(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: Cond, *, adapter: str | None,
              guidance: torch.Tensor | float | None) -> torch.Tensor:
        """One transformer evaluation, returned as eps_hat = x_t + (1 - s_t) v in float64 (module docstring)."""
        n = x_t.shape[0]
        s = self._levels(t, n, x_t.device)
        g = None
        if self.guidance_distilled:
            g = self.guidance_scale(0.0 if guidance is None else guidance, n, x_t.device)
        else:
            self._refuse_guidance(guidance)
        self._activate(adapter)
        self.counter.record(n)
        v = self.velocity(x_t.to(self.dtype), s, cond, guidance=g)
        one_minus_s = (1.0 - s).reshape(-1, *([1] * (x_t.ndim - 1)))
        return x_t.double() + one_minus_s * v.double()
