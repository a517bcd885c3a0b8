"""Distances used by the objectives (docs/method.md §5): pseudo-Huber and squared error, mean-reduced."""

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
