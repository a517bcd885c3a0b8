"""`icd train guidance`: distil two-pass classifier-free guidance into one UNet call (docs/method.md §6).

The student is the teacher UNet plus a zero-initialised 512-d `cond_proj` (guidance embedding e(w), the UNet's
``time_cond_proj_dim``); all UNet weights and `cond_proj` are trained with an L2 loss against the teacher's CFG
output, w drawn uniformly from the configured set, t uniform in 0..999, x_t from the data's latents. The text
encoder(s) and VAE stay frozen. Any family (the embedded model, SD 1.5, SDXL) and any dataset (`icd.train.feed`);
several processes split each global batch row-wise (``rank::world``) and average gradients, so N processes apply
the same update as one. The result is the teacher's pipeline folder with the distilled network in
``unet_guidance/`` (a flow model's: ``transformer_guidance/``)
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
from icd.models.loading import family_of, guidance_subfolder, load_model, resolve_model_path
from icd.runtime import Precision, ProcessGroup, step_generator
from icd.train.config import ConfigError, DataConfig, RunConfig, ScaleConfig
from icd.train.scaffold import FeedTrainer, Parts, Update, accumulate, optimizer_step, run_training
from icd.train.validation import validate_guidance

log = logging.getLogger(__name__)


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

    def index(self, rows: torch.Tensor) -> Batch:
        return Batch(self.z0[rows], self.cond.index(rows), self.uncond.index(rows),
                     {k: v[rows] for k, v in self.draws.items()})


def guidance_step(student: LatentDiffusion, teacher: LatentDiffusion, cfg: GuidanceConfig, batch: Batch, *,
                  opt: torch.optim.Optimizer, params: list, sync: ProcessGroup, precision: Precision) -> float:
    """One optimizer step of L_G: loss and backward per micro-batch (weighted by its share of the rows), then one
    averaged, clipped step. Returns the loss on this process's rows."""
    total = accumulate(lambda b: _loss(student, teacher, b), batch, rows=len(batch.z0),
                       accumulation=cfg.gradient_accumulation, precision=precision, objective="guidance")
    optimizer_step(Update("student", opt, params), precision, sync)
    precision.update()
    return total["guidance"]


def _loss(student: LatentDiffusion, teacher: LatentDiffusion, batch: Batch) -> dict[str, torch.Tensor]:
    d = batch.draws
    return guidance_loss(lambda codes: student.eps_fn(guidance=codes), teacher.eps_fn(), batch.z0, batch.cond,
                         uncond=batch.uncond, eps=d["eps"], t=d["t"], w=d["w"], schedule=teacher.schedule)


class GuidanceTrainer(FeedTrainer):
    name, columns, throughput = "guidance", ("guidance", "lr"), True

    def load(self) -> None:
        self.teacher = load_model(self.cfg.model, device=self.sync.device)
        self.teacher.unet.requires_grad_(False)
        self.make_feed(self.teacher)

    def build(self) -> Parts:
        teacher, cfg = self.teacher, self.cfg
        student = init_student_from_teacher(teacher.unet).to(self.sync.device)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
        # both networks through the one convention: the student is the teacher's bundle with the distilled UNet
        self.student = teacher.with_unet(student)
        self.student.name = f"{teacher.name}/student"
        if cfg.gradient_checkpointing:
            student.enable_gradient_checkpointing()
        student.train().requires_grad_(True)
        self.unet = student
        return Parts({"student": student}, [Update("student", opt, list(student.parameters()))])

    def batch(self, step: int, rows: torch.Tensor) -> Batch:
        draws = guidance_draws(self.cfg, step, n_data=self.feed.n_data, shape=self.feed.latent_shape,
                               num_timesteps=self.teacher.schedule.num_timesteps)
        d, z0, cond = self.local(step, draws, rows)
        return Batch(z0, cond, self.teacher.empty_cond(len(rows)), d)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return _loss(self.student, self.teacher, batch)

    def validate(self, images, captions, step: int) -> dict:
        return validate_guidance(self.student, self.teacher, images=images, captions=captions,
                                 prompts=self.cfg.validation_prompts, w_set=self.cfg.w_set, step=step, out=self.out)

    def export(self) -> Path:
        subfolder = guidance_subfolder(self.cfg.model)  # unet_guidance, or a flow model's transformer_guidance
        with atomic_directory(self.out / "final") as tmp:
            shutil.copytree(resolve_model_path(self.cfg.model), tmp, dirs_exist_ok=True, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns(subfolder, "icd"))
            save = getattr(family_of(self.teacher), "save_denoiser", None)  # SD3: + its guidance embedder's files
            if save is not None:
                save(self.unet.eval(), tmp / subfolder)
            else:
                self.unet.eval().save_pretrained(tmp / subfolder)
        return self.out / "final"


def train_guidance(cfg: GuidanceConfig, *, resume: bool = True) -> Path:
    return run_training(GuidanceTrainer(cfg), resume=resume)
