"""The consistency function of iCD (paper eq. 3; docs/method.md §2).

f_theta(x_t, t, s, c, w) = ddim_jump(x_t, eps_theta(x_t, t, c, e(w)), t -> s)

The same function serves the reverse model (s < t, jumping down to the segment boundary) and the forward model
(s > t, jumping up). The boundary condition f(x_s, s, s) = x_s holds by construction for s > 0, whatever the
network predicts. There is no LCM-style c_skip / c_out and no timestep scaling.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from icd.schedule import NoiseSchedule
from icd.solver import ddim_jump

if TYPE_CHECKING:  # the convention's types only: the math layer does not depend on the model layer
    from icd.models.base import Cond, EpsFn


def consistency_fn(eps: EpsFn, x_t: torch.Tensor, t: torch.Tensor | int, s: torch.Tensor | int, *, cond: Cond,
                   schedule: NoiseSchedule) -> torch.Tensor:
    """f(x_t, t, s, c) = ddim_jump(x_t, eps(x_t, t, c), t -> s): one network call, then the DDIM jump (per sample,
    fp32 jump). The guidance code and adapter are bound in `eps` (`LatentDiffusion.eps_fn`)."""
    return ddim_jump(x_t, eps(x_t, t, cond), t, s, schedule=schedule)
