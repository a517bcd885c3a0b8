"""`icd train icd`: invertible consistency distillation of two LoRA adapters (docs/method.md §5; paper eq. 5).

One frozen guidance-distilled UNet carries two adapters: ``rev_cd`` (R, noise -> image) and ``fwd_cd`` (F,
image -> noise). Each step draws one batch and one noise tensor and computes

    L_R = L_CD^R + lambda_r * L_r        (touches only R's adapter)
    L_F = L_CD^F + lambda_f * L_f        (touches only F's adapter)

Gradient routing (``update = "joint"``, the default): the gradient of L_R + L_F, accumulated term by term (each
loss is back-propagated, times its weight, right after it is computed), then one clip and one optimizer step per
adapter. It is exact because every pass through the *other* adapter runs under ``no_grad`` (R inside L_f, F inside
L_r, the teacher everywhere), adapter switches re-enable ``requires_grad`` on both adapters (peft would silently
disable the first one otherwise; `icd.models.lora`), and each backward runs while its adapter is still active
(gradient checkpointing recomputes with the active adapter; a test compares against no checkpointing).
``update = "sequential"`` reproduces the reference implementation: four backward/clip/step rounds per iteration in
the order R-CD, F-CD, L_f (F's optimizer), L_r (R's optimizer), where the lambdas act only through Adam's moment
estimates.

Backward distillation (``reverse_own_latents = p > 0``, off by default and not in the paper): a fraction p of the
reverse-CD rows start not from noised data but from R's own latents at an interior boundary E_R[j], decoded from
their noise by R itself (no gradient, constant w as in `icd generate`); their teacher step and target are as usual.
It trains each reverse jump on the inputs it meets when sampling (docs/experiments/backward-distillation.md).

One adapter at a time (``train = "reverse"`` / ``"forward"``; not in the paper): "reverse" trains R on L_CD^R alone
(a few-step generator with no forward model, standing in for a distilled generator that already exists, e.g.
FLUX.1-schnell); "forward" then trains only F, by L_CD^F + lambda_f L_f, against the frozen R of ``init_adapters``
(the reviewer's question: can a few-step generator that exists be inverted fast? docs/flow.md §8). The other
adapter gets no optimizer and no loss term. With ``reverse = "model"`` the frozen R is the network itself, with no
adapter and no guidance (FLUX.1-schnell: its own 4 Euler steps on the boundaries), and only F is saved
(``"reverse": "model"`` in adapters.json; `icd.models.lora.adapter_names`).

Several processes (``accelerate launch``): each process takes rows ``rank::world`` of the same global batch, and
LoRA gradients are averaged across processes before clipping, so the update equals a single-process step on the
global batch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from icd.boundaries import Boundaries
from icd.distill.icd import TEACHER_STEPS, forward_cd, forward_preserve, reverse_cd, reverse_preserve, reverse_rollout
from icd.io import atomic_directory
from icd.models import lora
from icd.models.base import Cond, EpsFn, GuidedEps, LatentDiffusion
from icd.models.loading import ModelError, family_of_folder, load_model, resolve_model_path
from icd.models.released import RELEASED_ALPHA, save_released
from icd.runtime import Precision, ProcessGroup, step_generator
from icd.train.checkpoint import checkpoint_problem, load_checkpoint
from icd.train.config import ConfigError, DataConfig, RunConfig, ScaleConfig, from_dict, to_dict
from icd.train.runner import lr_at
from icd.train.scaffold import EMA, FeedTrainer, Parts, Update, run_training
from icd.train.scale import micro_batches
from icd.train.validation import validate_icd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batch:
    """One step's (local) batch: clean latents, their captions' conditioning, the step's draws, the boundaries."""

    z0: torch.Tensor
    cond: Cond
    draws: dict
    boundaries: Boundaries
UPDATES = ("joint", "sequential")
TRAIN = ("both", "reverse", "forward")  # which adapters a run trains (module docstring)
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ICDConfig(ScaleConfig, DataConfig, RunConfig):
    out_dir: str = "runs/icd"
    model: str = "embedded"  # pipeline folder holding the guidance-distilled UNet
    unet_subfolder: str = "unet_guidance"
    boundaries: str = "4step-1"  # preset (icd.boundaries.PRESETS) unless reverse/forward lists are given
    reverse_boundaries: tuple[int, ...] = ()  # explicit E_R, e.g. [0, 259, 519, 779]
    forward_boundaries: tuple[int, ...] = ()  # explicit E_F, e.g. [259, 519, 779, 999]
    w_set: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)  # guidance codes for reverse CD, sampled uniformly
    tau: float = 0.8  # dynamic-CFG threshold recommended with these boundaries (inference only; docs/method.md §7)
    lambda_f: float = 1.5  # weight of L_f (trains F)
    lambda_r: float = 1.5  # weight of L_r (trains R)
    forward_cd: bool = True  # False: F learns from L_f alone (paper Table 2 row E, "encoder regime")
    reverse_own_latents: float = 0.0  # fraction of reverse-CD rows that start from R's own latents at an interior
    # boundary (decoded from noise by R itself, no gradient) instead of noised data; 0 = the paper's L_CD^R
    reverse_own_w: tuple[float, ...] = ()  # only rows drawn with these guidance codes may start from R's own
    # latents, e.g. [1, 2, 3] keeps the unguided R (which F inverts) on the paper's loss; () = every code
    huber_c: float = 1e-3
    rank: int = 64
    alpha: int = 8
    lr: float = 8e-6  # AdamW; the paper keeps it constant
    lr_schedule: str = "constant"  # "constant" (paper) | "cosine": cosine decay from lr to lr_min over `steps`
    steps: int = 6000
    update: str = "joint"  # "joint" (eq. 5 exactly) or "sequential" (reference compatibility)
    max_objects: int = 2
    ema_decay: float = 0.0  # > 0: keep an EMA of both adapters (`icd.train.scaffold.EMA`) and save it as final
    init_adapters: str = ""  # adapters folder (adapters.json + both files) to start from, e.g. to fine-tune at lower lr
    train: str = "both"  # "both" (eq. 5), "reverse" (R by L_CD^R only) or "forward" (F only, R frozen: init_adapters)
    reverse: str = "adapter"  # R: the reverse adapter, or "model": the network itself (train = "forward" only; schnell)

    def __post_init__(self):
        super().__post_init__()
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"ICDConfig.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                              f"got {self.lr_schedule!r}")
        if self.train not in TRAIN:
            raise ConfigError(f"ICDConfig.train must be one of {', '.join(TRAIN)}, got {self.train!r}")
        if self.reverse not in lora.REVERSES:
            raise ConfigError(f"ICDConfig.reverse must be one of {', '.join(lora.REVERSES)}, got {self.reverse!r}")
        if self.reverse == "model" and (self.train != "forward" or list(self.w_set) != [0.0]):
            raise ConfigError("ICDConfig: reverse = 'model' (the network itself decodes, unguided) trains F alone: "
                              "set train = 'forward' and w_set = [0.0]")
        if self.train == "forward" and self.reverse == "adapter" and not self.init_adapters:
            raise ConfigError("ICDConfig: train = 'forward' trains F against a frozen R: set init_adapters to the "
                              "folder of the reverse run (or reverse = 'model' when the network itself is R)")
        if self.update not in UPDATES:
            raise ConfigError(f"ICDConfig.update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if self.update == "sequential" and self.gradient_accumulation > 1:
            raise ConfigError("ICDConfig: update = 'sequential' steps once per loss term; it takes no "
                              "gradient_accumulation (use update = 'joint')")
        if not self.w_set or any(w < 0 for w in self.w_set):
            raise ConfigError(f"ICDConfig.w_set must be non-empty codes >= 0, got {self.w_set}")
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"ICDConfig.tau must lie in [0, 1], got {self.tau}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ICDConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.lambda_f < 0 or self.lambda_r < 0:
            raise ConfigError("ICDConfig.lambda_f and lambda_r must be >= 0")
        if not 0.0 <= self.reverse_own_latents <= 1.0:
            raise ConfigError(f"ICDConfig.reverse_own_latents must lie in [0, 1], got {self.reverse_own_latents}")
        if not self.forward_cd and self.lambda_f == 0:
            raise ConfigError("ICDConfig: forward_cd = false needs lambda_f > 0, or F would not train at all")
        if self.rank < 1 or self.alpha < 1 or not (math.isfinite(self.huber_c) and self.huber_c > 0):
            raise ConfigError(f"ICDConfig.rank, alpha and huber_c must be positive, got {self.rank}, {self.alpha}, "
                              f"{self.huber_c}")
        if not all(math.isfinite(w) for w in self.w_set):
            raise ConfigError(f"ICDConfig.w_set must hold finite codes, got {self.w_set}")
        try:
            boundaries = self.resolved_boundaries()  # validates
        except ValueError as e:
            raise ConfigError(f"ICDConfig: {e}") from None
        if self.reverse_own_latents and boundaries.num_segments < 2:
            raise ConfigError("ICDConfig.reverse_own_latents needs at least two segments (an interior boundary)")
        if not set(self.reverse_own_w) <= set(self.w_set):
            raise ConfigError(f"ICDConfig.reverse_own_w must be a subset of w_set {list(self.w_set)}, "
                              f"got {list(self.reverse_own_w)}")

    def resolved_boundaries(self) -> Boundaries:
        if self.reverse_boundaries or self.forward_boundaries:
            return Boundaries(self.reverse_boundaries, self.forward_boundaries)
        return Boundaries.preset(self.boundaries)


def learning_rate(cfg: ICDConfig, step: int) -> float:
    """The learning rate of optimizer step `step`: cfg.lr, or a cosine decay from cfg.lr to cfg.lr_min."""
    return lr_at(step, cfg) if cfg.lr_schedule == "cosine" else cfg.lr


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


def adapter_names(cfg: ICDConfig) -> tuple[str, ...]:
    """The adapters the run's network carries: both, or F alone when the network itself is R."""
    return lora.ADAPTERS if cfg.reverse == "adapter" else (lora.FORWARD,)


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


def _check_init_adapters(cfg: ICDConfig) -> None:
    """ConfigError unless cfg.init_adapters is a readable adapters folder of the config's rank and alpha."""
    try:
        meta = lora.adapters_meta(cfg.init_adapters)
    except ValueError as e:
        raise ConfigError(f"init_adapters: {e}") from None
    if (meta.get("rank"), meta.get("alpha")) != (cfg.rank, cfg.alpha):
        raise ConfigError(f"init_adapters {cfg.init_adapters} has rank/alpha {meta.get('rank')}/{meta.get('alpha')}, "
                          f"the config asks for {cfg.rank}/{cfg.alpha}")


def run_identity(targets: tuple[str, ...] = lora.LORA_TARGETS) -> dict:
    """What shapes the adapters besides the config (run.json, `icd.train.runner.check_run`): the LoRA targets."""
    return {"lora_targets": list(targets)}


def lora_targets(model_name: str) -> tuple[str, ...]:
    """The modules the adapters wrap on this teacher, by its family (`LORA_TARGETS` of `icd.models.sd15`, `flux`...)."""
    return family_of_folder(resolve_model_path(model_name)).LORA_TARGETS


class ICDTrainer(FeedTrainer):
    name, throughput = "icd", True
    columns = ("loss", "cd_reverse", "cd_forward", "preserve_forward", "preserve_reverse")

    def identity(self) -> dict:
        return run_identity(lora_targets(self.cfg.model))

    def check(self) -> None:
        cfg = self.cfg
        if cfg.init_adapters:
            _check_init_adapters(cfg)
        super().check()  # the dataset
        if not (resolve_model_path(cfg.model) / cfg.unet_subfolder).is_dir() and cfg.reverse == "adapter":
            raise ConfigError(f"{cfg.model} has no {cfg.unet_subfolder}/ (a guidance-distilled UNet); run "
                              "`icd train guidance` first, or set unet_subfolder")

    def load(self) -> None:
        cfg = self.cfg
        self.boundaries = cfg.resolved_boundaries()
        self.model = load_model(cfg.model, unet_subfolder=cfg.unet_subfolder, device=self.sync.device)
        if not self.model.guidance_distilled and cfg.reverse == "adapter":
            raise ConfigError(f"{cfg.model}/{cfg.unet_subfolder} is not guidance-distilled; run `icd train guidance`")
        self.make_feed(self.model)

    def build(self) -> Parts:
        cfg, unet = self.cfg, self.model.unet
        lora.add_adapters(unet, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, targets=lora_targets(cfg.model),
                          names=adapter_names(cfg))
        if cfg.init_adapters:  # weights only: the optimizer, step count and draws start afresh
            try:
                lora.load_adapters(unet, cfg.init_adapters, names=adapter_names(cfg))
            except ValueError as e:  # files of another model, or damaged
                raise ConfigError(f"init_adapters: {e}") from None
        unet.to(self.sync.device)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers checkpoints only in training mode (no dropout in these UNets)
        self.params, self.opts = adapter_optimizers(self.model, cfg)
        log.info("iCD boundaries E_R %s, E_F %s", list(self.boundaries.reverse), list(self.boundaries.forward))
        return Parts({"unet": unet}, [Update(name, opt, self.params[name]) for name, opt in self.opts.items()],
                     EMA(cfg.ema_decay, {"ema": self.params}) if cfg.ema_decay else None)

    def lr(self, step: int) -> float:
        return learning_rate(self.cfg, step)

    def batch(self, step: int, rows: torch.Tensor) -> Batch:
        draws = batch_draws(self.cfg, step, n_data=self.feed.n_data, shape=self.feed.latent_shape,
                            num_segments=self.boundaries.num_segments)
        d, z0, cond = self.local(step, draws, rows)
        return Batch(z0, cond, d, self.boundaries)

    def train_step(self, batch: Batch, rows: int) -> dict[str, float]:
        losses = training_step(self.model, self.cfg, batch, params=self.params, opts=self.opts, sync=self.sync,
                               precision=self.precision)
        losses = {k: v.detach() for k, v in losses.items()}
        values = {k: float(losses[k]) if k in losses else float("nan") for k in self.columns[1:5]}
        return values | {"loss": float(sum(v for v in adapter_objectives(losses, self.cfg).values()))}

    def validate(self, images, captions: list[str], step: int) -> dict:
        return validate_icd(self.model, self.boundaries, images=images, captions=captions,
                            prompts=self.cfg.validation_prompts, w=max(self.cfg.w_set), tau=self.cfg.tau, step=step,
                            out=self.out, reverse_adapter=self.cfg.reverse == "adapter")

    def export(self) -> Path:
        return save_icd_adapters(self.model, self.cfg, self.boundaries, self.out / "final")


def train_icd(cfg: ICDConfig, *, resume: bool = True) -> Path:
    return run_training(ICDTrainer(cfg), resume=resume)


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


def save_icd_adapters(model: LatentDiffusion, cfg: ICDConfig, boundaries: Boundaries, directory: Path) -> Path:
    """Both adapters in their own files plus adapters.json (boundaries, w set, tau, teacher, training config)."""
    metadata = {"method": "icd", "boundaries": boundaries.to_dict(), "w_set": list(cfg.w_set), "tau": cfg.tau,
                "teacher": cfg.model, "unet_subfolder": cfg.unet_subfolder, "rank": cfg.rank, "alpha": cfg.alpha,
                "targets": list(lora_targets(cfg.model)), "reverse": cfg.reverse, "config": to_dict(cfg)}
    with atomic_directory(directory) as tmp:
        lora.save_adapters(model.unet, tmp, metadata, names=adapter_names(cfg))
        if cfg.alpha == RELEASED_ALPHA and model.kind == "vp":  # the released format too (`--lora-forward / ...`)
            save_released(model.unet, tmp / "released", boundaries)
    return directory


def export_checkpoint(checkpoint: str | Path, directory: str | Path) -> Path:
    """Adapters of an intermediate checkpoint (``<out_dir>/step-NNNNNN``) written like a final save.

    A damaged checkpoint (a truncated or missing file, see `checkpoint_problem`) or one of another trainer is a
    `ModelError` naming the file, found before the model loads.
    """
    checkpoint = Path(checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ModelError(f"checkpoint {checkpoint}: {problem}")
    if not (checkpoint / "model.unet.safetensors").is_file():
        raise ModelError(f"checkpoint {checkpoint}: model.unet.safetensors is missing (not an iCD checkpoint)")
    state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    try:
        cfg = from_dict(ICDConfig, state["extra"]["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ModelError(f"checkpoint {checkpoint}: state.json holds no iCD config ({e})") from None
    model = load_model(cfg.model, unet_subfolder=cfg.unet_subfolder)
    lora.add_adapters(model.unet, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, targets=lora_targets(cfg.model),
                      names=adapter_names(cfg))
    load_checkpoint(checkpoint, modules={"unet": model.unet})
    return save_icd_adapters(model, cfg, cfg.resolved_boundaries(), Path(directory))
