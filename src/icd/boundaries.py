"""Multi-boundary segments of the forward and reverse consistency models (docs/method.md §3; paper Fig. 3).

The time axis 0..999 is split into m segments ``[E_R[j], E_F[j]]``. The reverse model (noise -> image) jumps from t
down to the segment's lower end E_R[j]; the forward model (image -> noise) jumps up to the upper end E_F[j].
Encoding starts at t = ``start`` (19), never at 0.

Released configurations:

========  ===================  =====================  ===========================  ====
name      E_R                  E_F                    reverse inference            tau
========  ===================  =====================  ===========================  ====
4step-1   0, 259, 519, 779     259, 519, 779, 999     999 -> 779 -> 519 -> 259 -> 0  0.8
4step-2   0, 249, 499, 699     249, 499, 699, 999     999 -> 699 -> 499 -> 249 -> 0  0.7
3step     0, 339, 699          339, 699, 999          999 -> 699 -> 339 -> 0         0.7
========  ===================  =====================  ===========================  ====
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Boundaries:
    reverse: tuple[int, ...]  # E_R: lower segment ends, starts with 0
    forward: tuple[int, ...]  # E_F: upper segment ends, ends with T - 1
    start: int = 19  # encoding starts here (x_19 = alpha_19 z0 + sigma_19 eps)
    num_timesteps: int = 1000

    def __post_init__(self):
        r, f = tuple(int(v) for v in self.reverse), tuple(int(v) for v in self.forward)
        object.__setattr__(self, "reverse", r)
        object.__setattr__(self, "forward", f)
        if len(r) != len(f) or len(r) < 1:
            raise ValueError(f"Boundaries: reverse {r} and forward {f} must have the same (non-zero) length")
        if r[0] != 0:
            raise ValueError(f"Boundaries.reverse must start at 0, got {r}")
        if f[-1] != self.num_timesteps - 1:
            raise ValueError(f"Boundaries.forward must end at {self.num_timesteps - 1}, got {f}")
        if any(a >= b for a, b in zip(r, r[1:])) or any(a >= b for a, b in zip(f, f[1:])):
            raise ValueError(f"Boundaries must be strictly increasing: reverse {r}, forward {f}")
        if f[:-1] != r[1:]:
            raise ValueError(f"Boundaries: forward[j] must equal reverse[j+1] (segments must tile), got {r} / {f}")
        if not 0 < self.start < f[0]:
            raise ValueError(f"Boundaries.start must lie in (0, {f[0]}), got {self.start}")

    @classmethod
    def preset(cls, name: str) -> Boundaries:
        try:
            r, f = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown boundary preset {name!r}; choose from {', '.join(PRESETS)}") from None
        return cls(r, f)

    @classmethod
    def parse(cls, text: str) -> Boundaries:
        """A preset name (``4step-1``) or the reverse boundaries E_R as a comma list (``0,259,519,779``; E_F follows:
        E_R[1:] then 999)."""
        text = str(text).strip()
        if text in PRESETS:
            return cls.preset(text)
        try:
            lower = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"boundaries must be a preset ({', '.join(PRESETS)}) or comma-separated reverse "
                             f"boundaries such as 0,259,519,779; got {text!r}") from None
        return cls(lower, (*lower[1:], 999))

    @property
    def num_segments(self) -> int:
        return len(self.reverse)

    # ---------------------------------------------------------------- training lookups (docs/method.md §3)
    def reverse_target(self, t_lo: torch.Tensor) -> torch.Tensor:
        """s = max{e in E_R : e <= t_lo}, per sample."""
        edges = torch.tensor(self.reverse, device=t_lo.device)
        return edges[torch.searchsorted(edges, t_lo, right=True) - 1]

    def forward_target(self, t_hi: torch.Tensor) -> torch.Tensor:
        """s = min{e in E_F : e >= t_hi}, per sample."""
        edges = torch.tensor(self.forward, device=t_hi.device)
        return edges[torch.searchsorted(edges, t_hi, right=False)]

    # ---------------------------------------------------------------- inference schedules
    def reverse_schedule(self) -> list[int]:
        """Decoding times: T-1 -> E_R[-1] -> ... -> E_R[1] -> 0."""
        return [self.forward[-1], *reversed(self.reverse)]

    def forward_schedule(self) -> list[int]:
        """Encoding times: start -> E_F[0] -> ... -> E_F[-1]."""
        return [self.start, *self.forward]

    def segment_of(self, t: int) -> int:
        """Index j of the segment with E_R[j] <= t < E_F[j] (t = T-1 belongs to the last)."""
        return min(bisect.bisect_right(self.reverse, t) - 1, self.num_segments - 1)

    def segment_ends(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l, u) = (E_R[j], or `start` where that is 0; E_F[j]) per sample: segment j's ends (docs/method.md §5.3)."""
        lower = torch.tensor(self.reverse, device=j.device)[j]
        upper = torch.tensor(self.forward, device=j.device)[j]
        return lower.clamp(min=self.start), upper

    def to_dict(self) -> dict:
        return {"reverse": list(self.reverse), "forward": list(self.forward), "start": self.start}


PRESETS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "4step-1": ((0, 259, 519, 779), (259, 519, 779, 999)),
    "4step-2": ((0, 249, 499, 699), (249, 499, 699, 999)),
    "3step": ((0, 339, 699), (339, 699, 999)),
}
