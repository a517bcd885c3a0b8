"""Image quality metrics that need no weights: PSNR, SSIM (whole-image or inside a mask; docs/baselines.md §9) and
MS-SSIM.

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
    lum_num, lum_den, cs_num, cs_den = _ssim_terms(_as_nchw(a), _as_nchw(b))
    value = (lum_num * cs_num) / (lum_den * cs_den)
    return value.mean(dim=1).numpy()


def _as_nchw(a: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float64 ``[N, C, H, W]`` tensor (values stay in 0..255)."""
    return torch.as_tensor(np.asarray(a), dtype=torch.float64).permute(0, 3, 1, 2)


def _ssim_terms(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Numerators and denominators of SSIM's luminance and contrast-structure maps, each ``[N, C, H, W]``.

    Wang et al. 2004 eq. 13 factors as l * cs with l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) and
    cs = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2); the four parts are returned unevaluated so that `ssim_map`
    can form (l_num cs_num) / (l_den cs_den) exactly as before. Local statistics: 11x11 Gaussian window
    (sigma 1.5) with reflect padding; `x` and `y` are float64 ``[N, C, H, W]`` in 0..255.
    """
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
    return 2 * mu_x * mu_y + c1, mu_x**2 + mu_y**2 + c1, 2 * cov + c2, var_x + var_y + c2


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image mean SSIM over the (masked) pixels; 1 for identical images."""
    values = ssim_map(a, b)
    m = _mask(mask, *values.shape)
    return (values * m).reshape(len(values), -1).sum(axis=1) / m.reshape(len(values), -1).sum(axis=1)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003: beta_j = gamma_j, alpha_M = beta_M


def ms_ssim_num_scales(height: int, width: int, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
    """How many MS-SSIM scales fit an image: the shorter side at the coarsest scale must stay >= `SSIM_WINDOW` (11).

    Each scale halves the size (floor, 2x2 average pooling), so 64x64 gives 3 scales (64, 32, 16; 8 < 11), 176x176
    gives 5 (the cap). Returns 0 for images smaller than the window.
    """
    n, side = 0, min(height, width)
    while side >= SSIM_WINDOW and n < max_scales:
        n, side = n + 1, side // 2
    return n


def ms_ssim(
    a: np.ndarray,
    b: np.ndarray,
    *,
    scales: int | None = None,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
) -> np.ndarray:
    """Per-image multi-scale SSIM (Wang, Simoncelli & Bovik 2003), in [0, 1]; 1 for identical images.

        MS-SSIM = SSIM_M^w_M * prod_{j < M} cs_j^w_j,

    where cs_j is the mean (over pixels and channels) of the contrast-structure map at scale j, SSIM_M the mean
    SSIM (luminance * contrast-structure) map at the coarsest scale M, and scale j + 1 is scale j 2x2
    average-pooled. The coarsest-scale term is the mean of l * cs, as in Wang's reference ``msssim.m`` (and
    torchmetrics / pytorch-msssim), rather than mean(l) * mean(cs); hence a single scale with weight 1 is exactly
    `ssim`. Local statistics are those of `ssim_map` (11x11 Gaussian, sigma 1.5, reflect padding).

    `scales` defaults to as many as fit (`ms_ssim_num_scales`: the shorter side at the coarsest scale stays >= 11),
    at most ``len(weights)`` (5): 3 for 64x64 images. The first `scales` weights are renormalised to sum to 1, so
    fewer scales still give a weighted geometric mean. Negative cs_j (and SSIM_M) are clamped to 0 before the power,
    as common implementations do (torchmetrics ``normalize="relu"``), so a fractional power never sees a negative
    base.
    """
    x, y = _as_nchw(a), _as_nchw(b)
    fit = ms_ssim_num_scales(*x.shape[2:], max_scales=len(weights))
    if fit == 0:
        raise ValueError(f"images of size {tuple(x.shape[2:])} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window")
    if scales is None:
        scales = fit
    if not 1 <= scales <= fit:
        raise ValueError(f"scales={scales} does not fit {tuple(x.shape[2:])} images with {len(weights)} weights "
                         f"(at most {fit})")
    w = torch.as_tensor(weights[:scales], dtype=torch.float64)
    w = w / w.sum()
    value = torch.ones(x.shape[0], dtype=torch.float64)
    for j in range(scales):
        lum_num, lum_den, cs_num, cs_den = _ssim_terms(x, y)
        if j < scales - 1:
            term = (cs_num / cs_den).mean(dim=(1, 2, 3))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:
            term = ((lum_num * cs_num) / (lum_den * cs_den)).mean(dim=(1, 2, 3))
        value = value * term.clamp(min=0.0) ** w[j]
    return value.numpy()
