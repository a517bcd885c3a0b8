"""Guidance: the guidance code, its embedding, and dynamic classifier-free guidance (docs/method.md §1, §6, §7).

Convention: every API takes the guidance **code** ``w = CFG - 1`` (unguided is w = 0; "CFG 8" is w = 7).
"""

from __future__ import annotations

import math

import torch

MAX_GUIDANCE = 100.0  # codes above this are a typo, not a setting (CFG 8 is w = 7)


def check_guidance(w: float) -> None:
    """ValueError unless `w` is a guidance code a run can use: finite, in [0, MAX_GUIDANCE]."""
    if not (math.isfinite(w) and 0.0 <= w <= MAX_GUIDANCE):
        raise ValueError(f"guidance (--guidance) must be a code w = CFG - 1 in [0, {MAX_GUIDANCE:g}], got {w}")


def check_tau(tau: float) -> None:
    """ValueError unless `tau`, the dynamic-CFG threshold (no guidance while t / 1000 > tau), lies in [0, 1]."""
    if not (math.isfinite(tau) and 0.0 <= tau <= 1.0):
        raise ValueError(f"tau (--tau) must lie in [0, 1], got {tau}")


def cfg_to_code(scale: float) -> float:
    """Classical CFG scale -> guidance code w = scale - 1."""
    return scale - 1.0


def code_to_cfg(w: float) -> float:
    """Guidance code w -> classical CFG scale 1 + w."""
    return w + 1.0


def guidance_embedding(w: torch.Tensor, dim: int = 512) -> torch.Tensor:
    """e(w): sinusoidal embedding of 1000 w in [sin | cos] order (docs/method.md §6; the LCM guidance embedding).

    f_k = exp(-ln(10000) k / (dim/2 - 1)), e(w) = [sin(1000 w f_k), cos(1000 w f_k)], k = 0..dim/2-1.
    w: [B] -> [B, dim] float32. e(0) = [0 ... 0, 1 ... 1].
    """
    if dim % 2:
        raise ValueError(f"embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = 1000.0 * w.float().reshape(-1, 1) * freqs.to(w.device)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def dynamic_guidance(t: int | torch.Tensor, w: torch.Tensor | float, tau: float | None) -> torch.Tensor:
    """Dynamic CFG (paper §3.4): w(t) = 0 if t / 1000 > tau else w; per sample.

    `w` is a float or a [B] tensor; `tau` None disables (constant guidance). Returns a float tensor shaped like w.
    """
    w = torch.as_tensor(w, dtype=torch.float32)
    if tau is None:
        return w
    t = torch.as_tensor(t)
    return torch.where(t.float() / 1000.0 > tau, torch.zeros_like(w), w)


def two_way_cfg(eps_uncond: torch.Tensor, eps_image: torch.Tensor, eps_full: torch.Tensor, *, image_scale: float,
                text_scale: float) -> torch.Tensor:
    """Two-way classifier-free guidance over an image and a text condition (Brooks, Holynski & Efros 2023,
    "InstructPix2Pix: Learning to Follow Image Editing Instructions", CVPR, eq. 3):

        eps = eps(0, 0) + s_I (eps(c_I, 0) - eps(0, 0)) + s_T (eps(c_I, c_T) - eps(c_I, 0))

    `eps_uncond` = eps(0, 0) (no image, no text), `eps_image` = eps(c_I, 0), `eps_full` = eps(c_I, c_T); s_I =
    `image_scale`, s_T = `text_scale` are classical scales (1: that condition unguided). s_I = 1 is plain text CFG
    conditioned on the image; s_I = s_T = 1 is the conditional prediction eps(c_I, c_T)."""
    return eps_uncond + image_scale * (eps_image - eps_uncond) + text_scale * (eps_full - eps_image)
