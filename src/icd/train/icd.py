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
(``"reverse": "model"`` in adapters.json; `icd.models.lora.names_for`).

Several processes (``accelerate launch``): each process takes rows ``rank::world`` of the same global batch, and
LoRA gradients are averaged across processes before clipping, so the update equals a single-process step on the
global batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from icd.boundaries import Boundaries
from icd.io import atomic_directory
from icd.models import lora
from icd.models.base import LatentDiffusion
from icd.models.loading import ModelError, family_of_folder, load_model, resolve_model_path
from icd.models.released import RELEASED_ALPHA, save_released
from icd.runtime import shard_frozen
from icd.train.checkpoint import checkpoint_problem, load_checkpoint
from icd.train.config import ConfigError, from_dict, to_dict
from icd.train.icd_config import ICDConfig
from icd.train.icd_step import Batch, adapter_objectives, adapter_optimizers, batch_draws, training_step
from icd.train.runner import lr_at
from icd.train.scaffold import EMA, FeedTrainer, Parts, Update, run_training
from icd.train.validation import validate_icd

log = logging.getLogger(__name__)


def learning_rate(cfg: ICDConfig, step: int) -> float:
    """The learning rate of optimizer step `step`: cfg.lr, or a cosine decay from cfg.lr to cfg.lr_min."""
    return lr_at(step, cfg) if cfg.lr_schedule == "cosine" else cfg.lr


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
        names = lora.names_for(cfg.reverse)
        lora.add_adapters(unet, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, targets=lora_targets(cfg.model),
                          names=names)
        if cfg.init_adapters:  # weights only: the optimizer, step count and draws start afresh
            try:
                lora.load_adapters(unet, cfg.init_adapters, names=names)
            except ValueError as e:  # files of another model, or damaged
                raise ConfigError(f"init_adapters: {e}") from None
        unet.to(self.sync.device)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            unet.train()  # diffusers checkpoints only in training mode (no dropout in these UNets)
        weights = lora.AdapterWeights(unet, names)
        if cfg.fsdp and self.sync.world > 1:
            units = shard_frozen(unet, self.sync, keep=list(weights.params.values()))
            self.validate_everywhere = True  # a sharded network's calls are collectives: every process validates
            log.info("fsdp: the frozen network sharded over %d processes in %d units", self.sync.world, units)
        elif cfg.fsdp:
            log.warning("fsdp = true in one process: nothing to shard (launch with torchrun / accelerate)")
        self.params, self.opts = adapter_optimizers(self.model, cfg)
        log.info("iCD boundaries E_R %s, E_F %s", list(self.boundaries.reverse), list(self.boundaries.forward))
        return Parts({"unet": weights}, [Update(name, opt, self.params[name]) for name, opt in self.opts.items()],
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
                            out=self.out if self.sync.is_main else None, reverse_adapter=self.cfg.reverse == "adapter")

    def export(self) -> Path:
        return save_icd_adapters(self.model, self.cfg, self.boundaries, self.out / "final")


def train_icd(cfg: ICDConfig, *, resume: bool = True) -> Path:
    return run_training(ICDTrainer(cfg), resume=resume)


def save_icd_adapters(model: LatentDiffusion, cfg: ICDConfig, boundaries: Boundaries, directory: Path) -> Path:
    """Both adapters in their own files plus adapters.json (boundaries, w set, tau, teacher, training config)."""
    metadata = {"method": "icd", "boundaries": boundaries.to_dict(), "w_set": list(cfg.w_set), "tau": cfg.tau,
                "teacher": cfg.model, "unet_subfolder": cfg.unet_subfolder, "rank": cfg.rank, "alpha": cfg.alpha,
                "targets": list(lora_targets(cfg.model)), "reverse": cfg.reverse, "config": to_dict(cfg)}
    with atomic_directory(directory) as tmp:
        lora.save_adapters(model.unet, tmp, metadata, names=lora.names_for(cfg.reverse))
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
    names = lora.names_for(cfg.reverse)
    lora.add_adapters(model.unet, rank=cfg.rank, alpha=cfg.alpha, seed=cfg.seed, targets=lora_targets(cfg.model),
                      names=names)
    load_checkpoint(checkpoint, modules={"unet": lora.AdapterWeights(model.unet, names)})
    return save_icd_adapters(model, cfg, cfg.resolved_boundaries(), Path(directory))
