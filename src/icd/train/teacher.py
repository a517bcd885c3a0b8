"""Train the embedded text-to-image teacher: CLIP text encoder + UNet on VAE latents of world renders.

Objective (epsilon prediction, SD's scaled_linear schedule, uniform t in 0..999)::

    eps = n + offset_noise * o,   n ~ N(0, I) [B,4,16,16],  o ~ N(0, I) [B,4,1,1]
    L   = E_t[ min(SNR_t, gamma) / SNR_t * || eps_theta(alpha_t z0 + sigma_t eps, t, c) - eps ||^2 ]

- *Offset noise* (from step 0) fixes embedded-notes pitfall 1: with SD's non-zero terminal SNR a flat background
  colour survives in the noise mean at t = 999, and a model trained on pure Gaussian noise learns to read the
  background from it instead of from the prompt. The per-channel offset makes the noise mean uninformative.
- *Min-SNR-gamma* weighting (Hang et al. 2023, gamma = 5) speeds up convergence.
- *Caption dropout* (10 %): the caption is replaced by the empty prompt, so classifier-free guidance works.
- EMA weights of UNet and text encoder are exported.
"""

from __future__ import annotations

import copy
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
from icd.train.runner import TrainingRun, check_run, lr_at, set_lr

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


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)


def train_teacher(cfg: TeacherConfig, *, resume: bool = True) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_run(cfg, resume=resume)  # before any model loads or any file changes
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL.from_pretrained(cfg.vae_path).eval().requires_grad_(False)
    z_all, captions = world_latents(vae, cfg.vae_path, cfg.n_images, max_objects=cfg.max_objects,
                                    cache_dir=out / CACHE)
    tokenizer = tiny.build_tokenizer(out / "tokenizer", world.vocabulary())
    ids_all = tokenizer(captions, padding="max_length", max_length=tiny.MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
    empty_ids = tokenizer([""], padding="max_length", max_length=tiny.MAX_LENGTH, return_tensors="pt").input_ids
    schedule = NoiseSchedule.scaled_linear()

    torch.manual_seed(cfg.seed)
    text_encoder, unet = tiny.build_text_encoder(tokenizer), tiny.build_unet()
    ema_text, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    run = TrainingRun(out, desc="train teacher", total_steps=cfg.steps, columns=["loss", "mse", "lr"],
                      modules=modules, optimizers={"teacher": opt}, config=cfg, log_every=cfg.log_every,
                      checkpoint_every=cfg.checkpoint_every, resume=resume)

    def lr_now(s: int) -> float:
        return cfg.lr * (s + 1) / cfg.warmup_steps if s < cfg.warmup_steps else lr_at(s, cfg)

    unet.train()
    text_encoder.train()
    with run:
        while not run.done:
            # 1. Per-step draws, a pure function of (seed, step)
            gen = step_generator(cfg.seed, run.step)
            idx = torch.randint(len(z_all), (cfg.batch_size,), generator=gen)
            t = torch.randint(0, schedule.num_timesteps, (cfg.batch_size,), generator=gen)
            eps = teacher_noise(tuple(z_all[idx].shape), cfg.offset_noise, gen)
            drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
            ids = torch.where(drop[:, None], empty_ids.expand(cfg.batch_size, -1), ids_all[idx])
            # 2. Loss, backward, clip, step
            lr = set_lr([opt], lr_now(run.step))
            losses = diffusion_loss(unet, text_encoder, z_all[idx], ids, t=t, eps=eps, schedule=schedule,
                                    snr_gamma=cfg.snr_gamma)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            # 3. EMA (warm-up: decay grows from 0.1 to ema_decay)
            decay = min(cfg.ema_decay, (1 + run.step) / (10 + run.step))
            ema_update(ema_unet, unet, decay)
            ema_update(ema_text, text_encoder, decay)
            run.end_step({"loss": losses["loss"].item(), "mse": losses["mse"].item(), "lr": lr})
    with atomic_directory(out / "final") as tmp:
        tiny.save_pipeline(tmp, tokenizer=tokenizer, text_encoder=ema_text, vae=vae, unet=ema_unet,
                           vocabulary=world.vocabulary())
    return out / "final"
