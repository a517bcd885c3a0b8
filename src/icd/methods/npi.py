"""``npi``: negative-prompt inversion (Miyake et al. 2023; docs/baselines.md §3): DDIM inversion, then an edit whose
classifier-free guidance runs against the source prompt instead of the empty one."""

from __future__ import annotations

import torch

from icd.editing.inversion import Inversion
from icd.methods.ddim import DDIM
from icd.models.base import Cond, LatentDiffusion


class NPI(DDIM):
    def uncond(self, model: LatentDiffusion, inversion: Inversion, cond_src: Cond, rows: torch.Tensor):
        """The source prompt's rows."""
        return cond_src.index(rows)
