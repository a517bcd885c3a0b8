"""Guidance distillation (docs/method.md §6; Meng et al. 2023; the iCD authors' recipe in reference issue #4).

A student UNet takes the guidance code as an input, e(w) through the UNet's time-conditioning projection
(``time_cond_proj_dim = 512``), and learns to match the teacher's two-pass classifier-free guidance in one call:

    L_G = E || eps_S(x_t, t, c, e(w)) - [(1 + w) eps_T(x_t, t, c) - w eps_T(x_t, t, empty)] ||^2
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from icd.losses import l2
from icd.models.base import Cond, EpsFn, GuidedEps, guided_eps
from icd.schedule import NoiseSchedule


def guidance_loss(student: GuidedEps, teacher: EpsFn, z0: torch.Tensor, cond: Cond, *, uncond: Cond,
                  eps: torch.Tensor, t: torch.Tensor, w: torch.Tensor, schedule: NoiseSchedule
                  ) -> dict[str, torch.Tensor]:
    """L_G for one batch: x_t = alpha_t z0 + sigma_t eps at per-sample t, guidance codes w ([B]). The target is the
    teacher's two-pass CFG (`guided_eps`); the student reads e(w) in one call."""
    x_t = schedule.add_noise(z0, eps, t)
    with torch.no_grad():
        target = guided_eps(teacher, w, uncond=uncond)(x_t, t, cond)
    pred = student(w)(x_t, t, cond)
    return {"guidance": l2(pred, target)}


def init_student_from_teacher(teacher_unet, *, cond_dim: int = 512):
    """A guidance-conditioned copy of `teacher_unet`: same weights, a zero-initialised bias-free `cond_proj`.

    With cond_proj = 0 the student equals the conditional teacher for every w, so w = 0 is exact from step 0.
    """
    config = dict(teacher_unet.config)
    config["time_cond_proj_dim"] = cond_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.endswith("cond_proj.weight") for k in missing):
        raise ValueError(f"teacher and student UNets differ beyond cond_proj: missing {missing}, "
                         f"unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(dtype=next(teacher_unet.parameters()).dtype)
