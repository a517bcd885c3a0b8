"""The consistency function of iCD (paper eq. 3; method.md §2).

f_theta(x_t, t, s, c, w) = ddim_jump(x_t, eps_theta(x_t, t, c, e(w)), t -> s)

The same function serves the reverse model (s < t, jumping down to the segment boundary) and the forward model
(s > t, jumping up). The boundary condition f(x_s, s, s) = x_s holds by construction for s > 0, whatever the
network predicts. There is no LCM-style c_skip / c_out and no timestep scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from icd.schedule import NoiseSchedule
from icd.solver import ddim_jump

# eps_fn(x_t, t) -> eps_hat; t is a per-sample LongTensor [B]
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def consistency_fn(eps_fn: EpsFn, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                   schedule: NoiseSchedule) -> torch.Tensor:
    """f(x_t, t, s): one network call, then the DDIM jump t -> s (per sample, fp32 jump)."""
    return ddim_jump(x_t, eps_fn(x_t, t), t, s, schedule)
