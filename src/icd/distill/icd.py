"""The four iCD training losses (method.md §5; paper eqs. 2, 4, 5). Each returns a dict of named tensors.

Notation: ``reverse(x, t, cond, w)`` / ``forward(x, t, cond)`` are the students' eps functions (the shared base with
the R or F adapter active), ``teacher(x, t, cond, w)`` is the guidance-distilled base with adapters disabled. All
four losses of a sample share one noise draw ``eps``. The functions never touch optimizers; gradient routing is the
caller's business.

In every loss the one gradient-carrying student call is the *last* UNet call. A caller that runs backward right
after each loss therefore gets correct gradients under gradient checkpointing, where the backward pass re-runs the
UNet with whichever adapter is active at that moment.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from icd.boundaries import Boundaries
from icd.losses import pseudo_huber
from icd.models.base import Cond
from icd.schedule import NoiseSchedule
from icd.solver import ddim_jump

GRID_STEP = 20  # DDIM-50 grid spacing: g_k = 19 + 20 k
GuidedEps = Callable[[torch.Tensor, torch.Tensor, Cond, torch.Tensor], torch.Tensor]  # (x, t, cond, w) -> eps
UnguidedEps = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # (x, t, cond) -> eps


def reverse_cd(reverse: GuidedEps, teacher: GuidedEps, z0: torch.Tensor, cond: Cond, eps: torch.Tensor,
               n: torch.Tensor, w: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, *,
               huber_c: float = 1e-3, start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """Reverse consistency distillation L_CD^R (method.md §5.1). n: grid index in 0..49 per sample.

    `start` = (rows, x, t) replaces those rows' noised data x_t_hi by given latents at times t (any t > 0, e.g. the
    reverse model's own latents from `reverse_rollout`); their teacher step and target follow from t as for the rest.
    """
    # 1. t_hi on the DDIM-50 grid, t_lo one teacher step below; 2. the boundary below t_lo
    t_hi = 19 + GRID_STEP * n
    x_hi = schedule.add_noise(z0, eps, t_hi)  # 4. noise real data
    if start is not None:
        rows, x_start, t_start = start
        x_hi[rows], t_hi[rows] = x_start.to(x_hi.dtype), t_start.to(t_hi.dtype)
    t_lo = (t_hi - GRID_STEP).clamp(min=0)
    s = boundaries.reverse_target(t_lo)
    with torch.no_grad():
        # 6. teacher DDIM step with the student's w (schedule's abar_0 at t_lo = 0, method.md §4)
        x_lo = ddim_jump(x_hi, teacher(x_hi, t_hi, cond, w), t_hi, t_lo, schedule, hard_zero=False)
        # 7. target: identity when t_lo is the boundary, else the same student from x_lo (never evaluated at t = s)
        y_target = x_lo.clone()
        rows = (t_lo != s).nonzero().flatten()
        if len(rows):
            eps_lo = reverse(x_lo[rows], t_lo[rows], cond.index(rows), w[rows])
            y_target[rows] = ddim_jump(x_lo[rows], eps_lo, t_lo[rows], s[rows], schedule)
    y = ddim_jump(x_hi, reverse(x_hi, t_hi, cond, w), t_hi, s, schedule)  # 5. online student jump (gradient)
    return {"cd_reverse": pseudo_huber(y, y_target, huber_c)}


@torch.no_grad()
def reverse_rollout(reverse: GuidedEps, x_top: torch.Tensor, cond: Cond, w: torch.Tensor, t_stop: torch.Tensor,
                    boundaries: Boundaries, schedule: NoiseSchedule) -> torch.Tensor:
    """The reverse model's own latents: x_top (noise at T-1) decoded down R's schedule T-1 -> E_R[-1] -> ... and
    stopped at t_stop per sample, a boundary E_R[j] with j >= 1, with constant guidance w as in `icd generate`.

    Reverse CD from these latents (the "backward distillation" of Kohler et al. 2024, Imagine Flash) trains R where
    it samples: at inference each jump starts from the previous jump's output, not from noised real data.
    """
    schedule_r = boundaries.reverse_schedule()
    if not set(t_stop.tolist()) <= set(boundaries.reverse[1:]):
        raise ValueError(f"reverse_rollout: t_stop must be interior reverse boundaries {boundaries.reverse[1:]}, "
                         f"got {sorted(set(t_stop.tolist()))}")
    x = x_top.clone()
    for t_from, t_to in zip(schedule_r, schedule_r[1:]):
        rows = (t_stop < t_from).nonzero().flatten()  # rows whose stop lies below t_from
        if not len(rows):
            break
        t = torch.full((len(rows),), t_from, device=x.device)
        eps = reverse(x[rows], t, cond.index(rows), w[rows])
        x[rows] = ddim_jump(x[rows], eps, t_from, t_to, schedule).to(x.dtype)
    return x


def forward_cd(forward: UnguidedEps, teacher: GuidedEps, z0: torch.Tensor, cond: Cond, eps: torch.Tensor,
               n: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, *,
               huber_c: float = 1e-3) -> dict[str, torch.Tensor]:
    """Forward consistency distillation L_CD^F (method.md §5.2), always unguided. n: grid index in 0..48."""
    t_lo = 19 + GRID_STEP * n
    t_hi = t_lo + GRID_STEP
    s = boundaries.forward_target(t_hi)
    zero = torch.zeros(z0.shape[0], device=z0.device)
    x_lo = schedule.add_noise(z0, eps, t_lo)
    with torch.no_grad():
        x_hi = ddim_jump(x_lo, teacher(x_lo, t_lo, cond, zero), t_lo, t_hi, schedule)  # DDIM inversion step
        y_target = x_hi.clone()
        rows = (t_hi != s).nonzero().flatten()
        if len(rows):
            eps_hi = forward(x_hi[rows], t_hi[rows], cond.index(rows))
            y_target[rows] = ddim_jump(x_hi[rows], eps_hi, t_hi[rows], s[rows], schedule)
    y = ddim_jump(x_lo, forward(x_lo, t_lo, cond), t_lo, s, schedule)  # online student jump (gradient)
    return {"cd_forward": pseudo_huber(y, y_target, huber_c)}


def segment_ends(j: torch.Tensor, boundaries: Boundaries) -> tuple[torch.Tensor, torch.Tensor]:
    """(l, u) = (E_R[j] or `start` when it is 0, E_F[j]) per sample (method.md §5.3)."""
    lower = torch.tensor(boundaries.reverse, device=j.device)[j]
    upper = torch.tensor(boundaries.forward, device=j.device)[j]
    return lower.clamp(min=boundaries.start), upper


def _cycle(first: UnguidedEps, second: UnguidedEps, x_start: torch.Tensor, t_start: torch.Tensor,
           t_mid: torch.Tensor, schedule: NoiseSchedule, huber_c: float) -> torch.Tensor:
    """d(second(first(x_start)), x_start): `first` jumps t_start -> t_mid without gradient, `second` jumps back."""
    with torch.no_grad():
        x_mid = ddim_jump(x_start, first(x_start, t_start), t_start, t_mid, schedule)
    x_back = ddim_jump(x_mid, second(x_mid, t_mid), t_mid, t_start, schedule)
    return pseudo_huber(x_back, x_start, huber_c)


def forward_preserve(forward: UnguidedEps, reverse: GuidedEps, z0: torch.Tensor, cond: Cond,
                     eps: torch.Tensor, j: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, *,
                     huber_c: float = 1e-3) -> dict[str, torch.Tensor]:
    """L_f = d(F(R(x_u)), x_u): trains F only, R runs without gradient, both unguided (paper eq. 4)."""
    lower, upper = segment_ends(j, boundaries)
    zero = torch.zeros(z0.shape[0], device=z0.device)
    x_u = schedule.add_noise(z0, eps, upper)
    loss = _cycle(lambda x, t: reverse(x, t, cond, zero), lambda x, t: forward(x, t, cond), x_u, upper, lower,
                  schedule, huber_c)
    return {"preserve_forward": loss}


def reverse_preserve(forward: UnguidedEps, reverse: GuidedEps, z0: torch.Tensor, cond: Cond,
                     eps: torch.Tensor, j: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, *,
                     huber_c: float = 1e-3) -> dict[str, torch.Tensor]:
    """L_r = d(R(F(x_l)), x_l): trains R only, F runs without gradient, both unguided (paper eq. 4)."""
    lower, upper = segment_ends(j, boundaries)
    zero = torch.zeros(z0.shape[0], device=z0.device)
    x_l = schedule.add_noise(z0, eps, lower)
    loss = _cycle(lambda x, t: forward(x, t, cond), lambda x, t: reverse(x, t, cond, zero), x_l, lower, upper,
                  schedule, huber_c)
    return {"preserve_reverse": loss}
