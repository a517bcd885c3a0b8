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

from dataclasses import dataclass, replace
from functools import cached_property

import torch

NUM_TIMESTEPS = 1000


@dataclass(frozen=True)
class NoiseSchedule:
    """The VP schedule's table. As iCD's math uses it, time 0 is clean data (`alpha_sigma`'s `hard_zero`).
    `configured()` is the same table with the end points the model's diffusers scheduler config gives DDIM
    (docs/baselines.md §2.1): with ``set_alpha_to_one = False`` time 0 is abar_0, not clean data (inversion's first
    jump starts from abar_0, decoding's last lands on it). Both keep DDIM's trailing grid (`ddim_grid`, ending at
    T - 1 for every step count; a config's "leading" spacing would stop a 4-step inversion at t = 751 and a 1-step
    one at t = 1)."""

    abar: torch.Tensor  # float64 [T], cumulative product of (1 - beta)
    set_alpha_to_one: bool = True  # the scheduler config's DDIM end points (used only by `configured()`)
    follow_config: bool = False  # True: this is `configured()`'s view

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
            table = cls.scaled_linear(start, end, n)
        elif kind == "linear":
            table = cls(torch.cumprod(1.0 - torch.linspace(start, end, n, dtype=torch.float64), dim=0))
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r}; supported: scaled_linear, linear")
        return replace(table, set_alpha_to_one=bool(get("set_alpha_to_one", True)))

    def configured(self) -> NoiseSchedule:
        """This table with its scheduler config's DDIM end points (class docstring)."""
        return replace(self, follow_config=True)

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
        """(alpha_t, sigma_t) as float64; with `hard_zero`, t = 0 means clean data: alpha = 1, sigma = 0 (§2) (in
        the `configured()` view only where the config sets ``set_alpha_to_one``)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        alpha, sigma = self.alpha(t), self.sigma(t)
        if hard_zero and (self.set_alpha_to_one or not self.follow_config):
            zero = t == 0
            alpha = torch.where(zero, torch.ones_like(alpha), alpha)
            sigma = torch.where(zero, torch.zeros_like(sigma), sigma)
        return alpha, sigma

    def coefficients(self, t: int, *, hard_zero: bool = True) -> tuple[float, float]:
        """`alpha_sigma` of one integer time as host floats (float64), from a table built once: a sampling loop's
        jumps then run no tensor operation and no host read for their coefficients."""
        if hard_zero and t == 0 and (self.set_alpha_to_one or not self.follow_config):
            return 1.0, 0.0
        return self._host_table[t]

    @cached_property
    def _host_table(self) -> list[tuple[float, float]]:
        return list(zip(self.abar.sqrt().tolist(), (1.0 - self.abar).sqrt().tolist()))

    def grid(self, num_steps: int) -> list[int]:
        """The ascending n-step sampling grid of this schedule: DDIM's (`ddim_grid`)."""
        return ddim_grid(num_steps, self.num_timesteps)

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        abar = self._abar(t)
        return abar / (1.0 - abar)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps, per sample (t: int or [B])."""
        alpha, sigma = self.alpha_sigma(t, hard_zero=False)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def _bcast(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """Per-sample coefficient [B] or scalar -> broadcastable to `like` ([B, ...]) in like's dtype (a host float, as
    `coefficients` gives, is used as it is)."""
    if isinstance(coef, float):
        return coef
    coef = coef.to(dtype=like.dtype, device=like.device)
    return coef.reshape(-1, *([1] * (like.ndim - 1))) if coef.ndim else coef


def check_steps(steps: int, max_steps: int = NUM_TIMESTEPS) -> None:
    """ValueError unless `steps` is a step count a sampler can take on a schedule of `max_steps` timesteps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise ValueError(f"steps (--steps) must be an integer in 1..{max_steps}, got {steps}")


def ddim_grid(num_steps: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """Ascending DDIM grid ending at T-1 with stride T // n: n = 50 gives 19, 39, ..., 999 (docs/method.md §1)."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_timesteps}, got {num_steps}")
    stride = num_timesteps // num_steps
    return [num_timesteps - 1 - (num_steps - 1 - k) * stride for k in range(num_steps)]


# ---------------------------------------------------------------------------------------------------------------------
# Rectified flow (docs/flow.md §1). The same two coefficients, (alpha, sigma) = (1 - s, s) for a noise level
# s in [0, 1], so `icd.solver.ddim_jump` serves both families: x_s = alpha_s x0 + sigma_s eps.


@dataclass(frozen=True)
class FlowSchedule:
    """The rectified-flow path of Liu et al. 2022 ("Flow Straight and Fast", eq. 1) as SD3 / FLUX use it:

        x_s = (1 - s) x0 + s eps,   s in [0, 1] (s = 1 pure noise, s = 0 clean data).

    Times are continuous float noise levels s (diffusers' FlowMatchEulerDiscreteScheduler "sigmas"; its timesteps
    are 1000 s). `alpha_sigma` has `NoiseSchedule.alpha_sigma`'s signature, so `ddim_jump(..., schedule=FlowSchedule())`
    is the DDIM jump of the flow path; s = 0 is exactly clean data, so `hard_zero` changes nothing.
    """

    def alpha_sigma(self, s: torch.Tensor | float, *, hard_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_s, sigma_s) = (1 - s, s) as float64 (`hard_zero` is accepted for `NoiseSchedule` parity)."""
        s = _flow_sigma(s)
        return 1.0 - s, s

    def snr(self, s: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio ((1 - s) / s)^2 (infinite at s = 0, zero at s = 1)."""
        s = _flow_sigma(s)
        return ((1.0 - s) / s) ** 2

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        """x_s = (1 - s) x0 + s eps, per sample (s: float or [B]); diffusers' ``scale_noise``."""
        alpha, sigma = self.alpha_sigma(s)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


FLOW_TOP = 1.0 - 1e-5  # the integer grid's top noise level (docs/flow.md §1): s = 1 would make alpha = 0


@dataclass(frozen=True)
class DiscreteFlowSchedule:
    """The rectified-flow path on the integer times t = 0..T-1 every sampler, jump and boundary set uses, so the VP
    code runs a flow model unchanged (docs/flow.md §1):

        s_t = shift_sigmas((t + 1) / T, shift) (t < T - 1),  s_{T-1} = FLOW_TOP,  (alpha_t, sigma_t) = (1 - s_t, s_t)

    Its n-step grid (`grid`) is FLUX's Euler grid ``linspace(1, 1/n, n)`` shifted by `shift` (`flow_grid`), and
    `ddim_jump` on it is the Euler step (`icd.solver.euler_step`). The top is 1 - 1e-5
    rather than 1: the epsilon form x0 = (x - sigma eps) / alpha of the jump needs alpha > 0; a flow model's epsilon
    is computed in float64 (`icd.models.flow`), so the division costs < 1e-10. With `hard_zero`, t = 0 is clean
    data (alpha = 1, sigma = 0), as for `NoiseSchedule`. Same interface as `NoiseSchedule`."""

    sigmas: torch.Tensor  # float64 [T]: s_t, increasing
    shift: float = 1.0

    @classmethod
    def shifted(cls, shift: float = 1.0, num_timesteps: int = NUM_TIMESTEPS) -> DiscreteFlowSchedule:
        """The table for a grid shift (FLUX: e^mu of its image-token count, `flux_mu`; SD3: its config's shift)."""
        base = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        sigmas = shift_sigmas(base, shift)
        sigmas[-1] = FLOW_TOP
        return cls(sigmas, float(shift))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.shape[0]

    def configured(self) -> DiscreteFlowSchedule:
        """The same (a flow scheduler config has no other DDIM end points or spacing: time 0 is clean data)."""
        return self

    def noise_level(self, t: torch.Tensor | int) -> torch.Tensor:
        """s_t (float64) for integer or [B] timesteps: the transformer's time input (diffusers passes 1000 s_t)."""
        return self.sigmas[torch.as_tensor(t, dtype=torch.long).cpu()]

    def grid(self, num_steps: int) -> list[int]:
        """The ascending n-step grid t_k = round(T (k + 1) / n) - 1: FLUX's Euler grid ``linspace(1, 1/n, n)`` (shifted
        here by the table) to the nearest integer time, exactly where n divides T (then `ddim_grid`'s)."""
        if not 1 <= num_steps <= self.num_timesteps:
            raise ValueError(f"num_steps must be in 1..{self.num_timesteps}, got {num_steps}")
        return [round(self.num_timesteps * (k + 1) / num_steps) - 1 for k in range(num_steps)]

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        return 1.0 - self.noise_level(t)

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        return self.noise_level(t)

    def alpha_sigma(self, t: torch.Tensor | int, *, hard_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - s_t, s_t) as float64; with `hard_zero`, t = 0 is clean data (1, 0)."""
        t = torch.as_tensor(t, dtype=torch.long).cpu()
        s = self.sigmas[t]
        if hard_zero:
            s = torch.where(t == 0, torch.zeros_like(s), s)
        return 1.0 - s, s

    def coefficients(self, t: int, *, hard_zero: bool = True) -> tuple[float, float]:
        """`alpha_sigma` of one integer time as host floats (float64; `NoiseSchedule.coefficients`)."""
        if hard_zero and t == 0:
            return 1.0, 0.0
        s = self._host_sigmas[t]
        return 1.0 - s, s

    @cached_property
    def _host_sigmas(self) -> list[float]:
        return self.sigmas.tolist()

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        s = self.noise_level(t)
        return ((1.0 - s) / s) ** 2

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = (1 - s_t) x0 + s_t eps, per sample (t: int or [B])."""
        alpha, sigma = self.alpha_sigma(t, hard_zero=False)
        return _bcast(alpha, x0) * x0 + _bcast(sigma, x0) * eps


def _flow_sigma(s: torch.Tensor | float) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=torch.float64).cpu()
    if s.numel() and (not torch.isfinite(s).all() or (s < 0).any() or (s > 1).any()):
        raise ValueError(f"flow noise level s must lie in [0, 1], got {s.tolist()}")
    return s


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The conditional flow-matching target v* = d x_s / d s = eps - x0 (Liu et al. 2022 eq. 1; Lipman et al. 2023;
    Esser et al. 2024 §2: the SD3 / FLUX training scripts regress onto ``noise - model_input``)."""
    return eps - x0


def velocity_to_x0(x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """x0_hat = x_s - s v (the path solved for x0 with eps = x0 + v); exact at every s, including s = 1."""
    return x_s - _bcast(_flow_sigma(s), x_s) * v


def velocity_to_eps(x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """eps_hat = x_s + (1 - s) v; exact at every s, including s = 0."""
    return x_s + _bcast(1.0 - _flow_sigma(s), x_s) * v


def x0_eps_to_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = eps - x0 (the inverse of `velocity_to_x0` / `velocity_to_eps` at a fixed (x_s, s))."""
    return eps - x0


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift (Esser et al. 2024 §5.3.2, eq. 23): s' = shift s / (1 + (shift - 1) s).

    shift > 1 spends more of a grid at high noise. FLUX's exponential dynamic shift is this map with shift = e^mu
    (diffusers' ``time_shift`` with ``time_shift_type="exponential"``); s = 0 and s = 1 are fixed points.
    """
    if not (shift > 0 and torch.isfinite(torch.tensor(float(shift)))):
        raise ValueError(f"shift must be a positive number, got {shift}")
    s = torch.as_tensor(s, dtype=torch.float64)
    return shift * s / (1.0 + (shift - 1.0) * s)


def flux_mu(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift exponent (diffusers ``calculate_shift``; BFL ``get_lin_function``):
    mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len - base_seq_len), a line through
    (256, 0.5) and (4096, 1.15) in the number L of packed image tokens. The grid is then shifted by e^mu."""
    if image_seq_len <= 0:
        raise ValueError(f"image_seq_len must be positive, got {image_seq_len}")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_grid(num_steps: int, *, shift: float = 1.0) -> list[float]:
    """Descending sampling grid of `num_steps` Euler steps: [s_0 = 1, ..., s_{N-1}, 0], the N + 1 values of
    ``FluxPipeline`` (``sigmas = linspace(1, 1/N, N)`` shifted by `shift`, then 0 appended by
    ``FlowMatchEulerDiscreteScheduler.set_timesteps``). Pass ``shift = e^mu`` (`flux_mu`) for FLUX's dynamic shift."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return [*shift_sigmas(base, shift).tolist(), 0.0]


def logit_normal_sigmas(n: int, *, mean: float = 0.0, std: float = 1.0, shift: float = 1.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Training noise levels s = shift_sigmas(sigmoid(u), shift), u ~ N(mean, std^2): the logit-normal density
    pi_ln(s; m, s) = 1 / (std sqrt(2 pi)) 1 / (s (1 - s)) exp(-(logit s - m)^2 / (2 std^2)) of Esser et al. 2024
    (§3.1, eq. 19; their recommended rf/lognorm(0.00, 1.00)), optionally shifted like the sampling grid. float32 [n]."""
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    u = mean + std * torch.randn(n, generator=generator, dtype=torch.float64)
    return shift_sigmas(torch.sigmoid(u), shift).float()


def eps_to_velocity(x_s: torch.Tensor, eps: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """v = (eps_hat - x_s) / (1 - s): the velocity behind a flow model's epsilon (`velocity_to_eps` solved for v; the
    `EpsFn` of `icd.models.flow` is eps_hat = x_s + (1 - s) v), exact for s < 1 (the integer grid's top is
    `FLOW_TOP`). `s` is the level the network read (float or per-sample [B]); computed in eps' dtype (float64 for a
    flow model) at least float32."""
    s = _flow_sigma(s)
    if s.numel() and bool((s >= 1).any()):
        raise ValueError(f"eps_to_velocity needs s < 1 (the epsilon form holds no velocity at pure noise), got "
                         f"{s.tolist()}")
    dtype = torch.promote_types(torch.promote_types(x_s.dtype, eps.dtype), torch.float32)
    e = eps.to(dtype)
    return (e - x_s.to(dtype)) / _bcast(1.0 - s, e)

