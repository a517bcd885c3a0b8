"""The four iCD training losses (docs/method.md §5; paper eqs. 2, 4, 5). Each returns a dict of named tensors.

Notation: every network is an `EpsFn` ``eps(x_t, t, cond)``. ``forward`` is F's (unguided); ``reverse(w)`` and
``teacher(w)`` give R's and the guidance-distilled teacher's eps function at per-sample guidance codes w (the shared
base with the R adapter active, or with adapters disabled). Student jumps are the consistency function (eq. 3). All
four losses of a sample share one noise draw ``eps``. The functions never touch optimizers; gradient routing is the
caller's business.

In every loss the one gradient-carrying student call is the *last* UNet call. A caller that runs backward right
after each loss therefore gets correct gradients under gradient checkpointing, where the backward pass re-runs the
UNet with whichever adapter is active at that moment.
"""

from __future__ import annotations

import torch

from icd.boundaries import Boundaries
from icd.consistency import consistency_fn
from icd.losses import pseudo_huber
from icd.models.base import Cond, EpsFn, GuidedEps
from icd.schedule import NoiseSchedule, ddim_grid
from icd.solver import ddim_jump

TEACHER_STEPS = 50  # the teacher's DDIM grid g_k = ddim_grid(50)[k] = 19 + 20 k (docs/method.md §4)


def teacher_grid(device: torch.device | str = "cpu") -> torch.Tensor:
    """The DDIM-50 grid g_0 < ... < g_49 as a tensor (grid indices n index it)."""
    return torch.tensor(ddim_grid(TEACHER_STEPS), device=device)


def reverse_cd(reverse: GuidedEps, teacher: GuidedEps, z0: torch.Tensor, cond: Cond, *, eps: torch.Tensor,
               n: torch.Tensor, w: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule,
               huber_c: float = 1e-3, start: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """Reverse consistency distillation L_CD^R (docs/method.md §5.1). n: grid index in 0..49 per sample.

    `start` = (rows, x, t) replaces those rows' noised data x_t_hi by given latents at times t (any t > 0, e.g. the
    reverse model's own latents from `reverse_rollout`); their teacher step and target follow from t as for the rest.
    """
    # 1. t_hi on the DDIM-50 grid, t_lo one teacher step below (0 below g_0); 2. the boundary below t_lo
    grid = teacher_grid(n.device)
    t_hi = grid[n]
    x_hi = schedule.add_noise(z0, eps, t_hi)  # 4. noise real data
    if start is not None:
        rows, x_start, t_start = start
        x_hi[rows], t_hi[rows] = x_start.to(x_hi.dtype), t_start.to(t_hi.dtype)
    t_lo = (t_hi - (grid[1] - grid[0])).clamp(min=0)
    s = boundaries.reverse_target(t_lo)
    with torch.no_grad():
        # 6. the teacher's DDIM step with the student's w (the schedule's abar_0 at t_lo = 0, docs/method.md §4)
        x_lo = ddim_jump(x_hi, teacher(w)(x_hi, t_hi, cond), t_hi, t_lo, schedule=schedule, hard_zero=False)
        # 7. target: identity when t_lo is the boundary, else the same student from x_lo (never evaluated at t = s)
        y_target = x_lo.clone()
        rows = (t_lo != s).nonzero().flatten()
        if len(rows):
            y_target[rows] = consistency_fn(reverse(w[rows]), x_lo[rows], t_lo[rows], s[rows],
                                            cond=cond.index(rows), schedule=schedule)
    y = consistency_fn(reverse(w), x_hi, t_hi, s, cond=cond, schedule=schedule)  # 5. online student (gradient)
    return {"cd_reverse": pseudo_huber(y, y_target, huber_c)}


@torch.no_grad()
def reverse_rollout(reverse: GuidedEps, x_top: torch.Tensor, cond: Cond, *, w: torch.Tensor, t_stop: torch.Tensor,
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
        x[rows] = consistency_fn(reverse(w[rows]), x[rows], t, t_to, cond=cond.index(rows),
                                 schedule=schedule).to(x.dtype)
    return x


def forward_cd(forward: EpsFn, teacher: GuidedEps, z0: torch.Tensor, cond: Cond, *, eps: torch.Tensor,
               n: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, huber_c: float = 1e-3
               ) -> dict[str, torch.Tensor]:
    """Forward consistency distillation L_CD^F (docs/method.md §5.2), always unguided. n: grid index in 0..48."""
    grid = teacher_grid(n.device)
    t_lo, t_hi = grid[n], grid[n + 1]
    s = boundaries.forward_target(t_hi)
    zero = torch.zeros(z0.shape[0], device=z0.device)
    x_lo = schedule.add_noise(z0, eps, t_lo)
    with torch.no_grad():
        x_hi = consistency_fn(teacher(zero), x_lo, t_lo, t_hi, cond=cond, schedule=schedule)  # a DDIM inversion step
        y_target = x_hi.clone()
        rows = (t_hi != s).nonzero().flatten()
        if len(rows):
            y_target[rows] = consistency_fn(forward, x_hi[rows], t_hi[rows], s[rows], cond=cond.index(rows),
                                            schedule=schedule)
    y = consistency_fn(forward, x_lo, t_lo, s, cond=cond, schedule=schedule)  # online student jump (gradient)
    return {"cd_forward": pseudo_huber(y, y_target, huber_c)}


def _cycle(first: EpsFn, second: EpsFn, x_start: torch.Tensor, cond: Cond, *, t_start: torch.Tensor,
           t_mid: torch.Tensor, schedule: NoiseSchedule, huber_c: float) -> torch.Tensor:
    """d(second(first(x_start)), x_start): `first` jumps t_start -> t_mid without gradient, `second` jumps back."""
    with torch.no_grad():
        x_mid = consistency_fn(first, x_start, t_start, t_mid, cond=cond, schedule=schedule)
    x_back = consistency_fn(second, x_mid, t_mid, t_start, cond=cond, schedule=schedule)
    return pseudo_huber(x_back, x_start, huber_c)


def forward_preserve(forward: EpsFn, reverse: GuidedEps, z0: torch.Tensor, cond: Cond, *, eps: torch.Tensor,
                     j: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, huber_c: float = 1e-3
                     ) -> dict[str, torch.Tensor]:
    """L_f = d(F(R(x_u)), x_u): trains F only, R runs without gradient, both unguided (paper eq. 4)."""
    lower, upper = boundaries.segment_ends(j)
    x_u = schedule.add_noise(z0, eps, upper)
    zero = torch.zeros(z0.shape[0], device=z0.device)
    loss = _cycle(reverse(zero), forward, x_u, cond, t_start=upper, t_mid=lower, schedule=schedule, huber_c=huber_c)
    return {"preserve_forward": loss}


def reverse_preserve(forward: EpsFn, reverse: GuidedEps, z0: torch.Tensor, cond: Cond, *, eps: torch.Tensor,
                     j: torch.Tensor, boundaries: Boundaries, schedule: NoiseSchedule, huber_c: float = 1e-3
                     ) -> dict[str, torch.Tensor]:
    """L_r = d(R(F(x_l)), x_l): trains R only, F runs without gradient, both unguided (paper eq. 4)."""
    lower, upper = boundaries.segment_ends(j)
    x_l = schedule.add_noise(z0, eps, lower)
    zero = torch.zeros(z0.shape[0], device=z0.device)
    loss = _cycle(forward, reverse(zero), x_l, cond, t_start=lower, t_mid=upper, schedule=schedule, huber_c=huber_c)
    return {"preserve_reverse": loss}
