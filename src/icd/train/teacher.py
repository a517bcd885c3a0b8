"""Train the embedded text-to-image teacher: CLIP text encoder + UNet on VAE latents of world renders.

Objective (epsilon prediction, SD's scaled_linear schedule, uniform t in 0..999)::

    eps = n + offset_noise * o,   n ~ N(0, I) [B,4,16,16],  o ~ N(0, I) [B,4,1,1]
    L   = E_t[ min(SNR_t, gamma) / SNR_t * || eps_theta(alpha_t z0 + sigma_t eps, t, c) - eps ||^2 ]

- *Offset noise* (from step 0) fixes embedded-notes pitfall 1: with SD's non-zero terminal SNR a flat background
  colour survives in the noise mean at t = 999, and a model trained on pure Gaussian noise learns to read the
  background from it instead of from the prompt. The per-channel offset makes the noise mean uninformative.
- *Min-SNR-gamma* weighting (Hang et al. 2023, gamma = 5) speeds up convergence.
- *Caption dropout* (10 %): the caption is replaced by the empty prompt, so classifier-free guidance works.
- EMA weights of UNet and text encoder are exported (`icd.train.scaffold.EMA`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from icd import world
from icd.io import atomic_directory
from icd.losses import min_snr_weight
from icd.models import tiny
from icd.runtime import step_generator
from icd.schedule import NoiseSchedule
from icd.train.config import ConfigError, RunConfig
from icd.train.data import CACHE, world_latents
from icd.train.runner import warmup_lr
from icd.train.scaffold import (
    EMA,
    Parts,
    Trainer,
    Update,
    run_training,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherConfig(RunConfig):
    out_dir: str = "runs/teacher"  # checkpoints, log.csv and final/ (a diffusers StableDiffusionPipeline folder)
    vae_path: str = "runs/vae/final"  # trained VAE (diffusers format)
    steps: int = 7000
    batch_size: int = 64
    lr: float = 5e-4  # AdamW; linear warm-up then cosine decay to lr_min
    lr_min: float = 1e-5
    warmup_steps: int = 200
    weight_decay: float = 0.0
    offset_noise: float = 0.1  # std of the per-channel constant added to the noise (0 disables)
    snr_gamma: float = 5.0  # min-SNR-gamma loss weighting (0 disables)
    caption_dropout: float = 0.1  # probability of training on the empty prompt
    ema_decay: float = 0.999
    max_objects: int = 2
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"TeacherConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.offset_noise < 0:
            raise ConfigError(f"TeacherConfig.offset_noise must be >= 0, got {self.offset_noise}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"TeacherConfig.ema_decay must lie in [0, 1), got {self.ema_decay}")


def teacher_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise plus a per-sample, per-channel constant of std `offset` (offset noise)."""
    eps = torch.randn(shape, generator=generator)
    if offset > 0:
        eps = eps + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return eps


def diffusion_loss(unet, text_encoder, z0, ids, *, t, eps, schedule: NoiseSchedule, snr_gamma: float,
                   condition: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Epsilon-prediction loss E[ w(t) * |eps - eps_theta([x_t, condition], t, c)|^2 ] with x_t = sqrt(abar_t) z0 +
    sqrt(1 - abar_t) eps and w = `min_snr_weight` (ones when snr_gamma <= 0).

    `condition` (optional) is concatenated to x_t along channels: InstructPix2Pix's source latent.
    Returns the weighted loss and the plain per-element MSE.
    """
    x_t = schedule.add_noise(z0, eps, t)
    unet_in = x_t if condition is None else torch.cat([x_t, condition], dim=1)
    pred = unet(unet_in, t, encoder_hidden_states=text_encoder(ids)[0]).sample
    per_sample = F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))
    weight = min_snr_weight(schedule.snr(t), snr_gamma)
    return {"loss": (weight * per_sample).mean(), "mse": per_sample.mean()}


class TeacherTrainer(Trainer):
    name, columns = "teacher", ("loss", "mse", "lr")

    def load(self) -> None:
        cfg = self.cfg
        self.vae = AutoencoderKL.from_pretrained(cfg.vae_path).eval().requires_grad_(False)
        self.z_all, captions = world_latents(self.vae, cfg.vae_path, cfg.n_images, max_objects=cfg.max_objects,
                                             cache_dir=self.out / CACHE)
        self.tokenizer = tiny.build_tokenizer(self.out / "tokenizer", world.vocabulary())
        self.ids_all = self.tokenizer(captions, padding="max_length", max_length=tiny.MAX_LENGTH, truncation=True,
                                      return_tensors="pt").input_ids
        self.empty_ids = self.tokenizer([""], padding="max_length", max_length=tiny.MAX_LENGTH,
                                        return_tensors="pt").input_ids
        self.schedule = NoiseSchedule.scaled_linear()

    def build(self) -> Parts:
        self.text_encoder, self.unet = tiny.build_text_encoder(self.tokenizer), tiny.build_unet()
        ema = EMA(self.cfg.ema_decay, {"ema_unet": self.unet, "ema_text_encoder": self.text_encoder})
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.unet.train()
        self.text_encoder.train()
        return Parts({"unet": self.unet, "text_encoder": self.text_encoder}, [Update("teacher", opt, params)], ema)

    def lr(self, step: int) -> float:
        return warmup_lr(step, self.cfg)

    def batch(self, step: int, rows: torch.Tensor) -> dict:  # one process: every row
        cfg, b = self.cfg, self.cfg.batch_size
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(len(self.z_all), (b,), generator=gen)
        t = torch.randint(0, self.schedule.num_timesteps, (b,), generator=gen)
        eps = teacher_noise(tuple(self.z_all[idx].shape), cfg.offset_noise, gen)
        drop = torch.rand(b, generator=gen) < cfg.caption_dropout
        ids = torch.where(drop[:, None], self.empty_ids.expand(b, -1), self.ids_all[idx])
        return {"z0": self.z_all[idx], "ids": ids, "t": t, "eps": eps}

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return diffusion_loss(self.unet, self.text_encoder, batch["z0"], batch["ids"], t=batch["t"], eps=batch["eps"],
                              schedule=self.schedule, snr_gamma=self.cfg.snr_gamma)

    def export(self) -> Path:  # the EMA weights (the scaffold copied them into the modules)
        with atomic_directory(self.out / "final") as tmp:
            tiny.save_pipeline(tmp, tokenizer=self.tokenizer, text_encoder=self.text_encoder, vae=self.vae,
                               unet=self.unet, vocabulary=world.vocabulary())
        return self.out / "final"


def train_teacher(cfg: TeacherConfig, *, resume: bool = True) -> Path:
    return run_training(TeacherTrainer(cfg), resume=resume)
