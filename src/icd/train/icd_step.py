"""One iCD training step (paper eq. 5; `icd.train.icd` runs them): the step's random draws, the losses of each adapter
assembled from `icd.distill.icd`, and the update (`update = "joint"` or ``"sequential"``, the gradient routing of
`icd.train.icd`'s docstring)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from icd.boundaries import Boundaries
from icd.distill.icd import TEACHER_STEPS, forward_cd, forward_preserve, reverse_cd, reverse_preserve, reverse_rollout
from icd.models import lora
from icd.models.base import Cond, EpsFn, GuidedEps, LatentDiffusion
from icd.runtime import Precision, ProcessGroup, step_generator
from icd.train.icd_config import ICDConfig
from icd.train.scale import micro_batches


@dataclass(frozen=True)
class Batch:
    """One step's (local) batch: clean latents, their captions' conditioning, the step's draws, the boundaries."""

    z0: torch.Tensor
    cond: Cond
    draws: dict
    boundaries: Boundaries


def networks(model: LatentDiffusion, trainable: tuple[str, ...] = lora.ADAPTERS, *, reverse: str = "adapter"
             ) -> tuple[GuidedEps, GuidedEps, EpsFn]:
    """The losses' three networks on one UNet, through the one calling convention: teacher(w) (adapters off), R(w)
    and F (unguided). The `trainable` adapters stay trainable whichever is active
    (`LatentDiffusion.trainable_adapters`). reverse = "model": R is the network itself, unguided (a few-step
    generator distilled without guidance, FLUX.1-schnell; its losses run at w = 0 alone)."""
    model.trainable_adapters = trainable
    if reverse == "model":
        return (lambda w: model.eps_fn(), lambda w: model.eps_fn(), model.eps_fn(adapter=lora.FORWARD))
    return (lambda w: model.eps_fn(guidance=w), lambda w: model.eps_fn(adapter=lora.REVERSE, guidance=w),
            model.eps_fn(adapter=lora.FORWARD))


def batch_draws(cfg: ICDConfig, step: int, *, n_data: int, shape: tuple[int, ...], num_segments: int) -> dict:
    """Every random draw of one step for the global batch: a pure function of (seed, step).

    Grid indices index the teacher's DDIM-50 grid (`icd.distill.icd.teacher_grid`): reverse CD starts at any of its
    points, forward CD at any but the last. The draws of `reverse_own_latents` come last and only when it is > 0, so
    the others do not depend on it.
    """
    gen = step_generator(cfg.seed, step)
    b = cfg.batch_size
    w_set = torch.tensor(cfg.w_set, dtype=torch.float32)
    draws = {
        "idx": torch.randint(n_data, (b,), generator=gen),
        "eps": torch.randn((b, *shape), generator=gen),  # one noise draw shared by the four losses
        "n_reverse": torch.randint(0, TEACHER_STEPS, (b,), generator=gen),
        "n_forward": torch.randint(0, TEACHER_STEPS - 1, (b,), generator=gen),
        "w": w_set[torch.randint(len(w_set), (b,), generator=gen)],
        "j_forward": torch.randint(num_segments, (b,), generator=gen),
        "j_reverse": torch.randint(num_segments, (b,), generator=gen),
    }
    if cfg.reverse_own_latents > 0:
        draws["own"] = torch.rand(b, generator=gen) < cfg.reverse_own_latents
        draws["own_j"] = torch.randint(1, num_segments, (b,), generator=gen)  # the interior boundary E_R[j]
    return draws


def own_latent_start(reverse: GuidedEps, cond: Cond, d: dict, *, boundaries: Boundaries, schedule,
                     own_w: tuple[float, ...] = ()):
    """`reverse_cd`'s `start` for the rows drawn to begin at R's own latents (None when there are none).

    With `own_w`, only rows whose guidance code is in it qualify (ICDConfig.reverse_own_w).
    """
    if "own" not in d:
        return None
    own = d["own"]
    if own_w:
        own = own & torch.isin(d["w"], torch.tensor(own_w, dtype=d["w"].dtype, device=d["w"].device))
    if not bool(own.any()):
        return None
    rows = own.nonzero().flatten()
    t = torch.tensor(boundaries.reverse, device=rows.device)[d["own_j"][rows]]
    x = reverse_rollout(reverse, d["eps"][rows], cond.index(rows), w=d["w"][rows], t_stop=t, boundaries=boundaries,
                        schedule=schedule)
    return rows, x, t


def trained_adapters(cfg: ICDConfig) -> tuple[str, ...]:
    """The adapters this run updates (`ICDConfig.train`)."""
    return {"both": lora.ADAPTERS, "reverse": (lora.REVERSE,), "forward": (lora.FORWARD,)}[cfg.train]


def loss_terms(model: LatentDiffusion, cfg: ICDConfig, batch: Batch) -> list[tuple[str, float, Callable]]:
    """Paper eq. 5 as (adapter it trains, weight, compute) in the order R-CD, F-CD, L_f, L_r; `compute()` returns
    {name: loss}. Terms with a zero weight (or F-CD when `forward_cd` is off) are left out, and so are the terms
    of an adapter the run does not train; a reverse-only run also drops L_r, whose F is untrained."""
    teacher, reverse, forward = networks(model, trained_adapters(cfg), reverse=cfg.reverse)
    z0, cond, d, b = batch.z0, batch.cond, batch.draws, batch.boundaries
    kw = dict(boundaries=b, schedule=model.schedule, huber_c=cfg.huber_c)

    def start():
        return own_latent_start(reverse, cond, d, boundaries=b, schedule=model.schedule, own_w=cfg.reverse_own_w)

    terms = [(lora.REVERSE, 1.0, lambda: reverse_cd(reverse, teacher, z0, cond, eps=d["eps"], n=d["n_reverse"],
                                                    w=d["w"], start=start(), **kw))]
    if cfg.forward_cd:
        terms.append((lora.FORWARD, 1.0, lambda: forward_cd(forward, teacher, z0, cond, eps=d["eps"],
                                                            n=d["n_forward"], **kw)))
    if cfg.lambda_f > 0:
        terms.append((lora.FORWARD, cfg.lambda_f, lambda: forward_preserve(forward, reverse, z0, cond, eps=d["eps"],
                                                                           j=d["j_forward"], **kw)))
    if cfg.lambda_r > 0 and cfg.train != "reverse":
        terms.append((lora.REVERSE, cfg.lambda_r, lambda: reverse_preserve(forward, reverse, z0, cond, eps=d["eps"],
                                                                           j=d["j_reverse"], **kw)))
    trained = trained_adapters(cfg)
    return [term for term in terms if term[0] in trained]


def icd_losses(model: LatentDiffusion, cfg: ICDConfig, batch: Batch,
               backward: Callable[[torch.Tensor], None] | None = None) -> dict[str, torch.Tensor]:
    """The four loss terms of one (local) batch; see the module docstring for the gradient routing.

    With `backward`, each term is back-propagated (times its weight in eq. 5) as soon as it is computed, while its
    adapter is still active: the sum of these gradients is the gradient of L_R + L_F, and it stays exact under
    gradient checkpointing. The returned values are then detached.
    """
    out: dict[str, torch.Tensor] = {}
    for _, weight, compute in loss_terms(model, cfg, batch):
        (name, loss), = compute().items()
        if backward is not None:
            backward(weight * loss)
            loss = loss.detach()
        out[name] = loss
    return out


def adapter_objectives(losses: dict[str, torch.Tensor], cfg: ICDConfig) -> dict[str, torch.Tensor]:
    """Paper eq. 5 split per adapter: {rev_cd: L_CD^R + lambda_r L_r, fwd_cd: L_CD^F + lambda_f L_f} (a term the run
    does not compute counts 0)."""
    zero = next(iter(losses.values())).new_zeros(())
    return {
        lora.REVERSE: losses.get("cd_reverse", zero) + cfg.lambda_r * losses.get("preserve_reverse", zero),
        lora.FORWARD: losses.get("cd_forward", zero) + cfg.lambda_f * losses.get("preserve_forward", zero),
    }


def adapter_optimizers(model: LatentDiffusion, cfg: ICDConfig):
    """({adapter: its LoRA parameters}, {adapter: its AdamW}) -- one optimizer per adapter."""
    params = {name: lora.lora_parameters(model.unet, name) for name in trained_adapters(cfg)}
    opts = {name: torch.optim.AdamW(p, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            for name, p in params.items()}
    return params, opts


def training_step(model: LatentDiffusion, cfg: ICDConfig, batch: Batch, *, params: dict, opts: dict,
                  sync: ProcessGroup, precision: Precision) -> dict[str, torch.Tensor]:
    """One iteration on this process's rows: the losses, backward passes and optimizer steps of `cfg.update`.

    ``joint``: every term back-propagated as it is computed, then one clip and step per adapter. ``sequential`` (the
    reference's update): each term its own backward / clip / step round on the adapter it trains.
    """
    if cfg.update == "joint":
        parts = micro_batches(len(batch.z0), cfg.gradient_accumulation)
        losses: dict[str, torch.Tensor] = {}
        for rows, weight in parts:
            micro = batch if len(parts) == 1 else Batch(batch.z0[rows], batch.cond.index(rows),
                                                        {k: v[rows] for k, v in batch.draws.items()},
                                                        batch.boundaries)
            with precision.autocast():
                part = icd_losses(model, cfg, micro, backward=(precision.backward if len(parts) == 1 else
                                                               lambda loss, wt=weight: precision.backward(wt * loss)))
            for k, v in part.items():
                losses[k] = losses.get(k, 0.0) + (v if len(parts) == 1 else weight * v)
        for name in params:
            precision.step(params[name], opts[name], sync)
        precision.update()
        return losses
    out: dict[str, torch.Tensor] = {}
    for name, weight, compute in loss_terms(model, cfg, batch):
        with precision.autocast():
            terms = compute()
        precision.backward(weight * sum(terms.values()))
        precision.step(params[name], opts[name], sync)
        precision.update()
        out |= {k: v.detach() for k, v in terms.items()}
    return out
