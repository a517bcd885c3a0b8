"""Distances used by the objectives (docs/method.md §5): pseudo-Huber and squared error, mean-reduced; and the
min-SNR-gamma weight of the teachers' epsilon loss."""

from __future__ import annotations

import torch


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """d(a, b) = mean( sqrt((a - b)^2 + c^2) - c ) over all elements (docs/method.md §5; iCD with c = 0.001).

    Computed in fp32. With c = 0.001 on latents this is effectively an L1 loss.
    """
    diff = a.float() - b.float()
    return (torch.sqrt(diff * diff + c * c) - c).mean()


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((a - b)^2) in fp32 (the guidance-distillation loss, docs/method.md §6)."""
    diff = a.float() - b.float()
    return (diff * diff).mean()


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """w(t) = min(SNR(t), gamma) / SNR(t): the min-SNR-gamma weight of an epsilon-prediction loss (Hang et al.,
    "Efficient Diffusion Training via Min-SNR Weighting Strategy", ICCV 2023, eq. 9 for epsilon targets).

    gamma <= 0 means no weighting (all ones). Computed in fp32.
    """
    snr = snr.float()
    if gamma <= 0:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=gamma) / snr
