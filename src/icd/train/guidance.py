"""`icd train guidance`: distil two-pass classifier-free guidance into one UNet call (docs/method.md §6).

The student is the teacher UNet plus a zero-initialised 512-d `cond_proj` (guidance embedding e(w)); all UNet
weights and `cond_proj` are trained with an L2 loss against the teacher's CFG output, w drawn uniformly from the
configured set, t uniform in 0..999, x_t from world latents. The text encoder and VAE stay frozen. The result is
the teacher's pipeline folder with the distilled UNet in ``unet_guidance/``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from icd.distill.guidance import guidance_loss, init_student_from_teacher
from icd.io import atomic_directory
from icd.models.base import Cond, LatentDiffusion
from icd.models.loading import load_model, resolve_model_path
from icd.runtime import step_generator
from icd.train.config import ConfigError, RunConfig
from icd.train.data import CACHE, caption_tokens, world_latents
from icd.train.runner import TrainingRun, lr_at, set_lr

log = logging.getLogger(__name__)
GUIDANCE_SUBFOLDER = "unet_guidance"


@dataclass(frozen=True)
class GuidanceConfig(RunConfig):
    out_dir: str = "runs/guidance"
    teacher: str = "embedded"  # pipeline folder of the two-pass CFG teacher ("embedded" = the shipped model)
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


def train_guidance(cfg: GuidanceConfig, *, resume: bool = True) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher = load_model(cfg.teacher)
    z_all, captions = world_latents(teacher.vae, resolve_model_path(cfg.teacher) / "vae", cfg.n_images,
                                    max_objects=cfg.max_objects, cache_dir=out / CACHE)
    tokens_all = caption_tokens(teacher, captions)
    uncond_tokens = teacher.encode_prompt([""]).tokens
    torch.manual_seed(cfg.seed)
    student = init_student_from_teacher(teacher.unet)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.0)
    run = TrainingRun(out, desc="train guidance", total_steps=cfg.steps, columns=["guidance", "lr"],
                      modules={"student": student}, optimizers={"student": opt}, config=cfg,
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, resume=resume)
    w_set = torch.tensor(cfg.w_set, dtype=torch.float32)

    # both networks through the one convention: the student is the teacher's bundle with the distilled UNet
    student_model = LatentDiffusion(tokenizer=teacher.tokenizer, text_encoder=teacher.text_encoder, vae=teacher.vae,
                                    unet=student, schedule=teacher.schedule, name=f"{teacher.name}/student",
                                    image_size=teacher.image_size, vocabulary=teacher.vocabulary)
    student.train().requires_grad_(True)

    with run:
        while not run.done:
            # 1. per-step draws: images, t, w, noise (a pure function of seed and step)
            gen = step_generator(cfg.seed, run.step)
            idx = torch.randint(len(z_all), (cfg.batch_size,), generator=gen)
            t = torch.randint(0, teacher.schedule.num_timesteps, (cfg.batch_size,), generator=gen)
            w = w_set[torch.randint(len(w_set), (cfg.batch_size,), generator=gen)]
            eps = torch.randn(z_all[idx].shape, generator=gen)
            cond = Cond(tokens=tokens_all[idx])
            uncond = Cond(tokens=uncond_tokens.expand(cfg.batch_size, -1, -1))
            # 2. loss, backward, clip, step
            lr = set_lr([opt], lr_at(run.step, cfg))
            losses = guidance_loss(lambda codes: student_model.eps_fn(guidance=codes), teacher.eps_fn(), z_all[idx],
                                   cond, uncond=uncond, eps=eps, t=t, w=w, schedule=teacher.schedule)
            opt.zero_grad(set_to_none=True)
            losses["guidance"].backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            run.end_step({"guidance": losses["guidance"].item(), "lr": lr})
    with atomic_directory(out / "final") as tmp:
        shutil.copytree(resolve_model_path(cfg.teacher), tmp, dirs_exist_ok=True)
        student.eval().save_pretrained(tmp / GUIDANCE_SUBFOLDER)
    return out / "final"
