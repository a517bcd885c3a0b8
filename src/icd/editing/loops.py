"""The reverse (editing) loops: a batch ``[sources..., targets...]`` decoded from the inverted noise, one UNet call
per step for both branches, with an attention controller (method.md §8.2, baselines.md §2-5).

- `distilled_edit`: a guidance-distilled UNet (iCD's reverse adapter, or DDIM on the distilled UNet): guidance is an
  input, so there is no unconditional half. Source rows run at w = 0, target rows at their own w with dynamic CFG.
  With `swap_tau`, target rows read the source prompt while t / 1000 > swap_tau (prompt swap, method.md §8.3).
- `cfg_edit`: the original UNet with two-pass CFG (DDIM, NPI, NTI baselines): one call on
  ``[uncond rows; cond rows]``; the unconditional embeddings may change per step (NTI) and may be the source
  prompt (NPI). Controllers act on the conditional half only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from icd.editing.controllers import Controller
from icd.guidance import dynamic_guidance
from icd.models.base import Cond, LatentDiffusion
from icd.solver import cfg_combine, ddim_loop


def _rows(x_sources: torch.Tensor, source_of: torch.Tensor) -> torch.Tensor:
    """[sources; each target's source] in the default memory format (oneDNN may hand back channels-last tensors,
    and a saved-and-loaded inversion must decode bit-identically)."""
    x_sources = x_sources.contiguous()
    return torch.cat([x_sources, x_sources[source_of]]).contiguous()


@torch.no_grad()
def distilled_edit(model: LatentDiffusion, noise: torch.Tensor, timesteps: Sequence[int], cond_src: Cond,
                   cond_tgt: Cond, controller: Controller, guidance: torch.Tensor, tau: float | None, *,
                   swap_tau: float | None = None) -> torch.Tensor:
    """Clean latents [S + T] decoded from `noise` [S] down `timesteps`; guidance [T] codes of the targets."""
    source_of = controller.source_of
    s = noise.shape[0]
    cond = Cond.cat([cond_src, cond_tgt])
    swapped = Cond.cat([cond_src, cond_src.index(source_of)])
    steps = list(timesteps)

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        controller.begin_step(steps.index(t), t)
        w = torch.cat([torch.zeros(s), dynamic_guidance(t, guidance, tau)])
        use = swapped if swap_tau is not None and t / 1000.0 > swap_tau else cond
        return model.eps(x, t, use, guidance=w)

    z0, _ = ddim_loop(eps_fn, _rows(noise, source_of), steps, model.schedule,
                      callback=lambda i, t0, t1, x: controller.on_latents(x))
    return z0


@torch.no_grad()
def cfg_edit(model: LatentDiffusion, noise: torch.Tensor, timesteps: Sequence[int], cond_src: Cond, cond_tgt: Cond,
             controller: Controller, guidance: torch.Tensor, tau: float | None,
             uncond_at: Callable[[int], Cond]) -> torch.Tensor:
    """Two-pass CFG editing; `uncond_at(i)` gives the [S + T] unconditional embeddings of step i. Sources run at
    w = `guidance` of their first target (the P2P convention guides both branches)."""
    source_of = controller.source_of
    s = noise.shape[0]
    cond = Cond.cat([cond_src, cond_tgt])
    first = torch.stack([guidance[(source_of == i).nonzero()[0, 0]] for i in range(s)])
    w_rows = torch.cat([first, guidance])
    steps = list(timesteps)
    controller.cond_offset = s + len(source_of)

    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        i = steps.index(t)
        controller.begin_step(i, t)
        w = dynamic_guidance(t, w_rows, tau)
        eps = model.eps(torch.cat([x, x]), t, Cond.cat([uncond_at(i), cond]))
        eps_u, eps_c = eps.chunk(2)
        return cfg_combine(eps_c, eps_u, w.to(x.device))

    z0, _ = ddim_loop(eps_fn, _rows(noise, source_of), steps, model.schedule,
                      callback=lambda i, t0, t1, x: controller.on_latents(x))
    return z0
