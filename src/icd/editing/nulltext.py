"""Null-text inversion (Mokady et al. 2023; docs/baselines.md §4): per-step unconditional embeddings that make guided
DDIM retrace the unguided DDIM inversion's pivot latents. Runs in fp32 (fp16 breaks the optimisation)."""

from __future__ import annotations

from dataclasses import replace

import torch
from tqdm.auto import tqdm

from icd.editing.inversion import Inversion
from icd.models.base import Cond, LatentDiffusion
from icd.samplers import Cancelled, StopFn
from icd.solver import cfg_combine, ddim_jump


def nti_learning_rate(i: int) -> float:
    """Adam step size at reverse step i: 1e-2 (1 - i / 100) (the NTI paper's schedule)."""
    return 1e-2 * (1.0 - i / 100.0)


def nti_threshold(i: int) -> float:
    """Early-stop level of the inner loop at reverse step i: 1e-5 + 2e-5 i."""
    return 1e-5 + i * 2e-5


def null_text_optimize(model: LatentDiffusion, inversion: Inversion, cond: Cond, *, guidance: float,
                       inner_steps: int = 10, progress: bool = False, should_stop: StopFn | None = None,
                       schedule=None) -> list[torch.Tensor]:
    """One unconditional token embedding [S, L, D] per reverse step of `inversion` (a DDIM inversion).

    Step i goes from the pivot at timesteps[-1 - i] to timesteps[-2 - i]: starting from the previous step's
    embedding (the empty prompt at i = 0), Adam minimises MSE(ddim_jump(x, CFG eps), pivot_next) for at most
    `inner_steps` iterations; as in the NTI reference code each iteration takes its Adam step and then stops that
    image if the loss it stepped on was below `nti_threshold(i)` (so every image takes at least one step per
    timestep); then x advances with the optimised embedding. A batch gives the same embeddings as inverting its
    images one by one. `should_stop()` is asked before each Adam iteration; True raises `icd.samplers.Cancelled`.
    `schedule`: the one the inversion was made on (default `model.schedule`).
    """
    schedule = schedule or model.schedule
    timesteps = list(reversed(inversion.timesteps))
    pivots = list(reversed(inversion.latents))
    # optimised in fp32 whatever the model's dtype: Adam on fp16 parameters under- and overflows (NaN in a few steps)
    empty = model.empty_cond(len(cond))  # SDXL: its pooled embedding and zeros stay as the pipeline defines them
    uncond = empty.tokens.detach().float()
    eps = model.eps_fn()  # the original UNet, unguided: CFG is combined here (the conditional half is computed once)
    x = pivots[0]
    w = torch.full((len(cond),), float(guidance))
    out = []
    for i in tqdm(range(len(timesteps) - 1), desc="null-text", disable=not progress, leave=False):
        t, t_next = timesteps[i], timesteps[i + 1]
        with torch.no_grad():
            eps_c = eps(x, t, cond)
        emb = uncond.clone().requires_grad_(True)
        opt = torch.optim.Adam([emb], lr=nti_learning_rate(i))
        active = torch.ones(len(cond), dtype=torch.bool, device=x.device)  # on the losses' device (&= with a CUDA mask)
        for _ in range(inner_steps):
            if should_stop is not None and should_stop():
                raise Cancelled("cancelled: should_stop() returned True")
            with torch.enable_grad():
                eps_u = eps(x, t, replace(empty, tokens=emb.to(model.dtype)))
                x_next = ddim_jump(x, cfg_combine(eps_c, eps_u, w), t, t_next, schedule=schedule)
                per_image = ((x_next - pivots[i + 1]) ** 2).flatten(1).mean(dim=1)
            opt.zero_grad(set_to_none=True)
            per_image[active].sum().backward()  # rows are independent: a batch runs like separate images
            kept = emb.detach().clone()
            opt.step()
            with torch.no_grad():
                emb[~active] = kept[~active]
            # early stop, image by image, after the step (the reference order: step, then test the step's loss)
            active &= per_image.detach() >= nti_threshold(i)
            if not bool(active.any()):
                break
        uncond = emb.detach()
        out.append(uncond.to(model.dtype))
        with torch.no_grad():
            eps_u = eps(x, t, replace(empty, tokens=out[-1]))
            x = ddim_jump(x, cfg_combine(eps_c, eps_u, w), t, t_next, schedule=schedule)
    return out
