"""Train the embedded model's `AutoencoderKL` on world renders.

Loss: MSE + l1_weight * L1 on pixels in [-1, 1] + kl_weight * KL(posterior || N(0, I)), as a plain autoencoder
with a small KL term (SD's VAE adds LPIPS and a GAN loss, which flat-coloured shapes do not need). After training
the latent scaling factor is measured as SD did: 1 / std of the posterior means over held-out images.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from icd import world
from icd.imageio import to_tensor
from icd.io import atomic_directory
from icd.models import tiny
from icd.runtime import step_generator
from icd.train.config import ConfigError, RunConfig
from icd.train.data import CACHE, world_dataset
from icd.train.scaffold import Parts, Trainer, Update, run_training

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAEConfig(RunConfig):
    out_dir: str = "runs/vae"  # checkpoints, log.csv and final/ (diffusers format)
    steps: int = 3000  # optimizer steps
    batch_size: int = 16
    lr: float = 1e-3  # AdamW, cosine decay to lr_min
    lr_min: float = 1e-5
    l1_weight: float = 0.5
    kl_weight: float = 1e-6
    n_images: int = 20000  # training renders: world seeds 0..n_images-1
    n_scale_images: int = 2000  # held-out renders used to measure the latent scaling factor
    levels: int = len(tiny.VAE_CHANNELS)  # resolution levels: 3 -> 16x16x4 latents, 2 -> 32x32x4

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.levels <= len(tiny.VAE_CHANNELS):
            raise ConfigError(f"VAEConfig.levels must lie in [1, {len(tiny.VAE_CHANNELS)}], got {self.levels}")
        if self.n_scale_images <= 0:
            raise ConfigError(f"VAEConfig.n_scale_images must be positive, got {self.n_scale_images}")


def vae_loss(vae, x: torch.Tensor, cfg: VAEConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    mse = torch.mean((recon - x) ** 2)
    l1 = torch.mean(torch.abs(recon - x))
    kl = posterior.kl().mean() / x[0].numel()
    return {"loss": mse + cfg.l1_weight * l1 + cfg.kl_weight * kl, "mse": mse, "l1": l1, "kl": kl}


@torch.no_grad()
def measure_scaling_factor(vae, n: int, batch: int = 200) -> float:
    images, _ = world_dataset(n, seed_start=world.EVAL_SEED_START)
    means = [vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean for i in range(0, n, batch)]
    return float(1.0 / torch.cat(means).std())


class VAETrainer(Trainer):
    name, columns = "vae", ("loss", "mse", "l1", "kl", "psnr", "lr")

    def load(self) -> None:
        self.images, _ = world_dataset(self.cfg.n_images, cache_dir=self.out / CACHE)

    def build(self) -> Parts:
        self.vae = tiny.build_vae(self.cfg.levels)
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        return Parts({"vae": self.vae}, [Update("vae", opt, list(self.vae.parameters()))])

    def batch(self, step: int, rows: torch.Tensor) -> dict:  # one process: every row
        gen = step_generator(self.cfg.seed, step)
        idx = torch.randint(len(self.images), (self.cfg.batch_size,), generator=gen).numpy()
        return {"x": to_tensor(self.images[idx]), "gen": gen}  # the loss draws its posterior sample from gen

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return vae_loss(self.vae, batch["x"], self.cfg, batch["gen"])

    def log_values(self, values: dict[str, float]) -> dict[str, float]:
        return values | {"psnr": 10 * math.log10(4.0 / values["mse"])}  # [-1, 1] has peak-to-peak 2

    def export(self) -> Path:
        self.vae.eval()
        scale = measure_scaling_factor(self.vae, self.cfg.n_scale_images)
        self.vae.register_to_config(scaling_factor=scale)
        with atomic_directory(self.out / "final") as tmp:
            self.vae.save_pretrained(tmp)
        log.info("latent scaling factor %.5f; VAE saved to %s", scale, self.out / "final")
        return self.out / "final"


def train_vae(cfg: VAEConfig, *, resume: bool = True) -> Path:
    return run_training(VAETrainer(cfg), resume=resume)
