"""The discrete noise schedule (docs/method.md §1) and step grids.

Symbol table (paper symbol -> code):

=============  ==========================  ===================================================================
paper          code                         meaning
=============  ==========================  ===================================================================
T              ``NUM_TIMESTEPS`` = 1000     number of discrete diffusion steps; t is an integer in 0..999
beta_t         ``betas``                    SD "scaled_linear": linspace(sqrt(0.00085), sqrt(0.012), 1000)**2
abar_t         ``abar``                     prod_{i<=t} (1 - beta_i); abar_0 = 0.99915, not 1
alpha_t        ``alpha(t)``                 sqrt(abar_t)
sigma_t        ``sigma(t)``                 sqrt(1 - abar_t);  x_t = alpha_t x0 + sigma_t eps
g_k            ``ddim_grid(50)``            DDIM-50 grid 19 + 20k, k = 0..49
=============  ==========================  ===================================================================

The schedule is data (a float64 tensor), not scheduler state: every function takes explicit integer timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TIMESTEPS = 1000


@dataclass(frozen=True)
class NoiseSchedule:
    abar: torch.Tensor  # float64 [T], cumulative product of (1 - beta)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = NUM_TIMESTEPS):
        """Stable Diffusion's schedule: betas linear in sqrt-space."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def from_scheduler_config(cls, config) -> NoiseSchedule:
        """Build from a diffusers scheduler config (only ``scaled_linear`` and ``linear`` betas are supported)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        kind = get("beta_schedule", "linear")
        if get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(f"only epsilon-prediction models are supported, got {get('prediction_type')!r}")
        start, end, n = get("beta_start", 0.0001), get("beta_end", 0.02), get("num_train_timesteps", 1000)
        if kind == "scaled_linear":
            return cls.scaled_linear(start, end, n)
        if kind == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
            return cls(torch.cumprod(1.0 - betas, dim=0))
        raise ValueError(f"unsupported beta_schedule {kind!r}; supported: scaled_linear, linear")

    @property
    def num_timesteps(self) -> int:
        return self.abar.shape[0]

    def _abar(self, t: torch.Tensor | int) -> torch.Tensor:
        """abar_t for int or [B] timesteps on any device (the table stays on the CPU in float64)."""
        return self.abar[torch.as_tensor(t, dtype=torch.long).cpu()]

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        return self._abar(t).sqrt()

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        return (1.0 - self._abar(t)).sqrt()

    def alpha_sigma(self, t: torch.Tensor | int, *, hard_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) as float64; with `hard_zero`, t = 0 means clean data: alpha = 1, sigma = 0 (§2)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        alpha, sigma = self.alpha(t), self.sigma(t)
        if hard_zero:
            zero = t == 0
            alpha = torch.where(zero, torch.ones_like(alpha), alpha)
            sigma = torch.where(zero, torch.zeros_like(sigma), sigma)
        return alpha, sigma

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        abar = self._abar(t)
        return abar / (1.0 - abar)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, per sample (t: int or [B])."""
        alpha, sigma = self.alpha_sigma(t, hard_zero=False)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def _bcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample coefficient [B] or scalar -> broadcastable to `like` ([B, ...]) in like's dtype."""
    coef = coef.to(dtype=like.dtype, device=like.device)
    return coef.reshape(-1, *([1] * (like.ndim - 1))) if coef.ndim else coef


def ddim_grid(num_steps: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """Ascending DDIM grid ending at T-1 with stride T // n: n = 50 gives 19, 39, ..., 999 (docs/method.md §1)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_timesteps}, got {num_steps}")
    stride = num_timesteps // num_steps
    return [num_timesteps - 1 - (num_steps - 1 - k) * stride for k in range(num_steps)]
