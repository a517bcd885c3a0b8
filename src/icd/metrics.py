"""Image quality metrics that need no weights: PSNR and SSIM, whole-image or inside a mask (baselines.md §6).

All functions take uint8 RGB batches ``[N, H, W, 3]`` (numpy) and return one value per image. A mask is a boolean
``[N, H, W]`` or ``[H, W]`` array selecting the pixels that count (e.g. the background outside an edit mask).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K = (0.01, 0.03)


def _mask(mask: np.ndarray | None, n: int, h: int, w: int) -> np.ndarray:
    if mask is None:
        return np.ones((n, h, w), dtype=bool)
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), (n, h, w))
    if not mask.reshape(n, -1).any(axis=1).all():
        raise ValueError("a mask selects no pixels for at least one image")
    return mask


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, ceiling: float = 100.0) -> np.ndarray:
    """Per-image PSNR = 10 log10(255^2 / MSE) in dB over the (masked) pixels; exact matches give `ceiling`."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    m = _mask(mask, *a.shape[:3])[..., None]
    sq = ((a - b) ** 2) * m
    mse = sq.reshape(a.shape[0], -1).sum(axis=1) / (m.reshape(a.shape[0], -1).sum(axis=1) * a.shape[-1])
    with np.errstate(divide="ignore"):
        val = 10.0 * np.log10(255.0**2 / mse)
    return np.minimum(val, ceiling)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM [N, H, W] (channel mean), Wang et al. 2004 eq. 13:

        SSIM = (2 mu_a mu_b + C1)(2 sigma_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2)),

    with C_i = (K_i * 255)^2 and local statistics from an 11x11 Gaussian window (sigma 1.5). Borders use reflect
    padding so the map has the image's size and masks line up with it.
    """
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).permute(0, 3, 1, 2)
    c = x.shape[1]
    kernel = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)
    pad = SSIM_WINDOW // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="reflect"), kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K[0] * 255) ** 2, (SSIM_K[1] * 255) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.mean(dim=1).numpy()


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image mean SSIM over the (masked) pixels; 1 for identical images."""
    values = ssim_map(a, b)
    m = _mask(mask, *values.shape)
    return (values * m).reshape(len(values), -1).sum(axis=1) / m.reshape(len(values), -1).sum(axis=1)
