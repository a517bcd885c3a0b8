"""Guidance distillation (docs/method.md §6; Meng et al. 2023; the iCD authors' recipe in reference issue #4).

A student network takes the guidance code as an input, e(w), and learns to match the teacher's two-pass
classifier-free guidance in one call:

    L_G = E || eps_S(x_t, t, c, e(w)) - [(1 + w) eps_T(x_t, t, c) - w eps_T(x_t, t, empty)] ||^2

A UNet reads e(w) through its time-conditioning projection (``time_cond_proj_dim = 512``, the LCM convention); a
FLUX transformer through its own guidance embedder (``guidance_embeds``, FLUX.1-dev's form: the scale 1 + w embedded
like the time and added to it; docs/flow.md §8); an SD3 transformer, which has none, through ours on its pooled
input (`icd.models.sd3.SD3GuidanceEmbedder`). For a flow model the loss is the same in its epsilon form: the
epsilon of a velocity is affine in it at fixed (x, s), so matching the guided epsilon matches the guided velocity
(times 1 - s).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from icd.losses import l2
from icd.models import sd3
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


def init_student_from_teacher(teacher, *, cond_dim: int = 512):
    """A guidance-conditioned copy of the teacher network (a UNet, a FLUX or an SD3 transformer): the same weights
    plus a guidance input whose contribution starts at zero, so the student equals the conditional teacher for every
    w and w = 0 is exact from step 0.

    UNet: a zero-initialised bias-free ``cond_proj`` (``time_cond_proj_dim = cond_dim``). FLUX transformer:
    ``guidance_embeds = True``, its guidance embedder's output layer zero-initialised (the first layer keeps diffusers'
    initialisation, so gradients reach it once the output layer moves). SD3 transformer: `sd3.guidance_student`."""
    if isinstance(teacher, FluxTransformer2DModel):
        return _flux_student(teacher)
    if isinstance(teacher, SD3Transformer2DModel):
        return sd3.guidance_student(teacher)
    if not isinstance(teacher, UNet2DConditionModel):
        raise TypeError(f"teacher: guidance distillation takes a UNet2DConditionModel, a FluxTransformer2DModel or an "
                        f"SD3Transformer2DModel, got {type(teacher).__name__}")
    config = dict(teacher.config)
    config["time_cond_proj_dim"] = cond_dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.endswith("cond_proj.weight") for k in missing):
        raise ValueError(f"teacher and student UNets differ beyond cond_proj: missing {missing}, "
                         f"unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(dtype=next(teacher.parameters()).dtype)


def _flux_student(teacher: FluxTransformer2DModel) -> FluxTransformer2DModel:
    if teacher.config.guidance_embeds:
        raise ValueError("teacher: this FLUX transformer already embeds a guidance scale (guidance-distilled)")
    config = dict(teacher.config)
    config["guidance_embeds"] = True
    student = FluxTransformer2DModel.from_config(config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(".guidance_embedder." not in f".{k}" for k in missing):
        raise ValueError(f"teacher and student transformers differ beyond the guidance embedder: missing {missing}, "
                         f"unexpected {unexpected}")
    out = student.time_text_embed.guidance_embedder.linear_2
    torch.nn.init.zeros_(out.weight)
    torch.nn.init.zeros_(out.bias)
    return student.to(dtype=next(teacher.parameters()).dtype)
