"""`icd train guidance`: distil two-pass classifier-free guidance into one UNet call (docs/method.md §6).

The student is the teacher UNet plus a zero-initialised 512-d `cond_proj` (guidance embedding e(w), the UNet's
``time_cond_proj_dim``); all UNet weights and `cond_proj` are trained with an L2 loss against the teacher's CFG
output, w drawn uniformly from the configured set, t uniform in 0..999, x_t from the data's latents. The text
encoder(s) and VAE stay frozen. Any family (the embedded model, SD 1.5, SDXL) and any dataset (`icd.train.feed`);
several processes split each global batch row-wise (``rank::world``) and average gradients, so N processes apply
the same update as one. The result is the teacher's pipeline folder with the distilled UNet in ``unet_guidance/``
(files hard-linked where the file system allows, else copied).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from icd.distill.guidance import guidance_loss, init_student_from_teacher
from icd.io import atomic_directory
from icd.models.base import Cond, LatentDiffusion
from icd.models.loading import load_model, resolve_model_path
from icd.runtime import Precision, ProcessGroup, step_generator
from icd.train.config import ConfigError, DataConfig, RunConfig, ScaleConfig
from icd.train.feed import make_feed, open_data
from icd.train.runner import TrainingRun, check_run, lr_at, set_lr
from icd.train.scale import describe_batch, micro_batches, open_run_tracker, precision_mode
from icd.train.validation import validate_guidance

log = logging.getLogger(__name__)
GUIDANCE_SUBFOLDER = "unet_guidance"


@dataclass(frozen=True)
class GuidanceConfig(ScaleConfig, DataConfig, RunConfig):
    out_dir: str = "runs/guidance"
    model: str = "embedded"  # pipeline folder or hub id of the two-pass CFG teacher ("embedded" = the shipped model)
    w_set: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)  # guidance codes w = CFG - 1, sampled uniformly
    steps: int = 2000
    batch_size: int = 64
    lr_min: float = 1e-6
    max_objects: int = 2

    def __post_init__(self):
        super().__post_init__()
        if not self.w_set or any(w < 0 for w in self.w_set):
            raise ConfigError(f"GuidanceConfig.w_set must be a non-empty list of codes >= 0, got {self.w_set}")
        if 0.0 not in self.w_set:
            raise ConfigError("GuidanceConfig.w_set must contain 0 (unguided), which iCD's forward model uses")


def link_or_copy(src: str, dst: str) -> None:
    """Hard-link `src` to `dst` (a pipeline's multi-GB weights are not duplicated), else copy it."""
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)


def guidance_draws(cfg: GuidanceConfig, step: int, *, n_data: int, shape: tuple[int, ...], num_timesteps: int
                   ) -> dict:
    """The step's draws for the global batch, a pure function of (seed, step): data indices (world data), t, w,
    noise."""
    gen = step_generator(cfg.seed, step)
    b = cfg.batch_size
    w_set = torch.tensor(cfg.w_set, dtype=torch.float32)
    idx = torch.randint(n_data, (b,), generator=gen)
    t = torch.randint(0, num_timesteps, (b,), generator=gen)
    w = w_set[torch.randint(len(w_set), (b,), generator=gen)]
    return {"idx": idx, "t": t, "w": w, "eps": torch.randn((b, *shape), generator=gen)}


@dataclass(frozen=True)
class Batch:
    """One step's rows on this process: clean latents, caption and empty-prompt conditioning, the step's draws."""

    z0: torch.Tensor
    cond: Cond
    uncond: Cond
    draws: dict


def guidance_step(student: LatentDiffusion, teacher: LatentDiffusion, cfg: GuidanceConfig, batch: Batch, *,
                  opt: torch.optim.Optimizer, params: list, sync: ProcessGroup, precision: Precision) -> float:
    """One optimizer step of L_G: loss and backward per micro-batch (weighted by its share of the rows), then one
    averaged, clipped step. Returns the loss on this process's rows."""
    d, total = batch.draws, 0.0
    for part, weight in micro_batches(len(batch.z0), cfg.gradient_accumulation):
        with precision.autocast():
            losses = guidance_loss(lambda codes: student.eps_fn(guidance=codes), teacher.eps_fn(), batch.z0[part],
                                   batch.cond.index(part), uncond=batch.uncond.index(part), eps=d["eps"][part],
                                   t=d["t"][part], w=d["w"][part], schedule=teacher.schedule)
        precision.backward(weight * losses["guidance"])
        total += weight * float(losses["guidance"].detach())
    precision.step(params, opt, sync)
    precision.update()
    return total


def train_guidance(cfg: GuidanceConfig, *, resume: bool = True) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_run(cfg, resume=resume)  # before any model loads or any file changes
    source = open_data(cfg)  # the dataset is checked before any model is loaded
    try:
        sync = ProcessGroup(cfg.device)
    except ValueError as e:  # an unknown device name, or cuda on a machine without one (before any compute)
        raise ConfigError(f"GuidanceConfig.device: {e}") from None
    precision = Precision(precision_mode(cfg, sync), sync.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(cfg.model, device=sync.device)
    teacher.unet.requires_grad_(False)
    feed = make_feed(source, teacher, cfg, out=out, rank=sync.rank, world=sync.world)
    tracker = open_run_tracker(cfg, out, sync)
    if source is None:
        uncond_tokens = teacher.encode_prompt([""]).tokens
    torch.manual_seed(cfg.seed)
    student = init_student_from_teacher(teacher.unet).to(sync.device)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    run = TrainingRun(out, desc="train guidance", total_steps=cfg.steps,
                      columns=["guidance", "lr"] + ([] if source is None else ["skipped"]),
                      modules={"student": student}, optimizers={"student": opt}, config=cfg,
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, resume=resume,
                      is_main=sync.is_main, stateful={"precision": precision}, images_per_step=cfg.batch_size,
                      tracker=tracker)
    # both networks through the one convention: the student is the teacher's bundle with the distilled UNet
    student_model: LatentDiffusion = teacher.with_unet(student)
    student_model.name = f"{teacher.name}/student"
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train().requires_grad_(True)
    params = list(student.parameters())
    log.info("guidance distillation: %s", describe_batch(cfg, sync, precision.mode))
    wants_validation = sync.is_main and cfg.n_validation > 0 and bool(cfg.validate_every or source)
    validation = feed.validation(cfg.n_validation) if wants_validation else None

    with run:
        while not run.done:
            # 1. global draws (a pure function of seed and step), then this process's rows
            d = guidance_draws(cfg, run.step, n_data=feed.n_data, shape=feed.latent_shape,
                               num_timesteps=teacher.schedule.num_timesteps)
            rows = torch.arange(sync.rank, cfg.batch_size, sync.world)
            d = {k: v[rows].to(sync.device) for k, v in d.items()}
            z0, cond = feed.rows(run.step, d["idx"], sync.device)
            uncond = (Cond(tokens=uncond_tokens.expand(len(rows), -1, -1)) if source is None
                      else teacher.empty_cond(len(rows)))
            # 2. loss and backward per micro-batch, then one averaged, clipped step
            lr = set_lr([opt], lr_at(run.step, cfg))
            total = guidance_step(student_model, teacher, cfg, Batch(z0, cond, uncond, d), opt=opt, params=params,
                                  sync=sync, precision=precision)
            values = {"guidance": total, "lr": lr}
            if source is not None:
                values["skipped"] = feed.skipped_total
            run.end_step(values)
            if validation is not None and cfg.validate_every and run.step % cfg.validate_every == 0:
                log.info("validation at step %d: %s", run.step, validate_guidance(
                    student_model, teacher, images=validation[0], captions=validation[1],
                    prompts=cfg.validation_prompts, w_set=cfg.w_set, step=run.step, out=out))
            sync.barrier()  # no process reads a checkpoint before the main process has written it
    if validation is not None and (not cfg.validate_every or cfg.steps % cfg.validate_every):
        log.info("validation at step %d: %s", run.step, validate_guidance(
            student_model, teacher, images=validation[0], captions=validation[1], prompts=cfg.validation_prompts,
            w_set=cfg.w_set, step=run.step, out=out))
    if sync.is_main:
        with atomic_directory(out / "final") as tmp:
            shutil.copytree(resolve_model_path(cfg.model), tmp, dirs_exist_ok=True, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns(GUIDANCE_SUBFOLDER, "icd"))
            student.eval().save_pretrained(tmp / GUIDANCE_SUBFOLDER)
    sync.barrier()
    return out / "final"
