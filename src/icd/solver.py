"""Deterministic DDIM between any two integer times, its re-noised variant and the CFG combination
(docs/method.md §2, §4). Pure tensor functions; the loops built on them live in `icd.samplers`."""

from __future__ import annotations

import torch

from icd.schedule import NoiseSchedule, _bcast, _flow_sigma


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor | float, sigma_t: torch.Tensor | float
              ) -> torch.Tensor:
    """x0_hat = (x_t - sigma_t eps) / alpha_t."""
    return (x_t - _bcast(sigma_t, x_t) * eps) / _bcast(alpha_t, x_t)


def ddim_jump(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t_from: torch.Tensor | int,
    t_to: torch.Tensor | int,
    *,
    schedule: NoiseSchedule,
    hard_zero: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from `t_from` to `t_to`, either direction (docs/method.md §2; paper eq. 3).

    x0_hat = (x_t - sigma_t eps) / alpha_t, then x_s = alpha_s x0_hat + sigma_s eps.
    With `hard_zero`, time 0 is clean data (alpha = 1, sigma = 0): a jump to 0 returns x0_hat and a jump from 0 treats
    x as x0. For t_from == t_to > 0 the jump is the identity for any eps (the boundary condition). Computed in fp32
    (at least; float64 where eps is, as a flow model's is near s = 1) whatever the dtype of the inputs; returned in
    x_t's dtype.
    """
    dtype = torch.promote_types(torch.promote_types(x_t.dtype, eps.dtype), torch.float32)
    x, e = x_t.to(dtype), eps.to(dtype)
    # a loop's integer times take host floats (no tensor op, no host read); per-row times take tensors
    coefficients = schedule.coefficients if isinstance(t_from, int) and isinstance(t_to, int) else schedule.alpha_sigma
    a_t, s_t = coefficients(t_from, hard_zero=hard_zero)
    a_s, s_s = coefficients(t_to, hard_zero=hard_zero)
    x0 = eps_to_x0(x, e, a_t, s_t)
    return (_bcast(a_s, x) * x0 + _bcast(s_s, x) * e).to(x_t.dtype)


def renoised_jump(x_t: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int, *, schedule: NoiseSchedule,
                  gamma: float, z: torch.Tensor) -> torch.Tensor:
    """One step of stochastic multistep consistency sampling from `t_from` down to `t_to` (generation only).

    x_s = alpha_s x0_hat + sigma_s ((1 - gamma^2)^(1/2) eps + gamma z),  z ~ N(0, I) fresh,
    the gamma-sampling of CTM (Kim et al. 2023, §4.3): gamma = 0 is the deterministic DDIM jump (`ddim_jump`, the
    iCD paper's sampler, the only one that can be inverted), gamma = 1 re-noises x0_hat with fresh noise as in the
    multistep consistency sampling of Song et al. 2023 (Alg. 1) and LCM. A jump to 0 returns x0_hat for any gamma.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"renoised_jump: gamma must lie in [0, 1], got {gamma}")
    if gamma == 0:
        return ddim_jump(x_t, eps, t_from, t_to, schedule=schedule)
    x0 = ddim_jump(x_t, eps, t_from, 0, schedule=schedule)  # x0_hat
    # from 0: alpha_s x0_hat + sigma_s n with the mixed noise n
    return ddim_jump(x0, (1 - gamma**2) ** 0.5 * eps + gamma * z, 0, t_to, schedule=schedule)


def cfg_combine(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance with guidance code w = CFG - 1 (Meng et al. 2023): eps_c + w (eps_c - eps_u).

    `w` is a float or a per-sample [B] tensor; w = 0 returns the conditional prediction.
    """
    w = torch.as_tensor(w, dtype=eps_cond.dtype, device=eps_cond.device)
    return eps_cond + _bcast(w, eps_cond) * (eps_cond - eps_uncond)


class NumericsError(FloatingPointError):
    """NaN or Inf appeared in the latents; the message names the step."""


def euler_step(x: torch.Tensor, v: torch.Tensor, s_from: torch.Tensor | float, s_to: torch.Tensor | float
               ) -> torch.Tensor:
    """One Euler step of the rectified-flow ODE dx/ds = v (docs/flow.md §1; Liu et al. 2022; diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``): x_{s'} = x_s + (s' - s) v, either direction.

    This is exactly the DDIM jump of the flow path: with x0_hat = x - s v and eps_hat = x + (1 - s) v,
    (1 - s') x0_hat + s' eps_hat = x + (s' - s) v, i.e. ``ddim_jump(x, eps_hat, s, s', schedule=FlowSchedule())``.
    The velocity form never divides by 1 - s, so it also holds at s = 1 (pure noise). It is the iCD consistency
    function of a velocity model: c_skip = 1, c_out = s' - s, the identity at s' = s. Computed in fp32 (at least),
    returned in x's dtype; `s_from` / `s_to` are floats or per-sample [B] tensors.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    ds = _flow_sigma(s_to) - _flow_sigma(s_from)
    return (xf + _bcast(ds, xf) * v.to(dtype)).to(x.dtype)
