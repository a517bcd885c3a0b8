"""Validation during training: a fixed set of images and prompts, measured every `validate_every` steps.

- guidance stage: the student's distillation error against the teacher's two-pass CFG on the validation images
  (fixed noise, t on a fixed grid, every w of the w set), and a grid of student samples (DDIM, 25 steps);
- iCD stage: the reconstruction PSNR of forward-then-reverse inversion (the trained boundaries, unguided, as
  `icd invert`), and a grid: validation images | their reconstructions | 4-step samples of the prompts.

Each validation appends a row to ``<out_dir>/validation.csv`` and writes ``<out_dir>/validation/step-NNNNNN.png``.
Only the main process validates.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from icd.boundaries import Boundaries
from icd.imageio import save_image, to_uint8
from icd.losses import l2
from icd.metrics import psnr
from icd.models import lora
from icd.models.base import LatentDiffusion, guided_eps
from icd.samplers import ddim_loop, generation_timesteps, icd_decode, icd_invert, initial_noise

SEED = 1234  # the validation noise
T_GRID = (99, 299, 499, 699, 899)  # timesteps of the guidance-distillation validation error
SAMPLE_STEPS = 25


def grid(rows: list[np.ndarray]) -> np.ndarray:
    """uint8 image rows [N, H, W, 3] (equal N, H, W) stacked into one [R*H, N*W, 3] picture."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


def _append_row(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(list(row))
        writer.writerow(list(row.values()))


def _prompts(captions: list[str], prompts: tuple[str, ...]) -> list[str]:
    return list(prompts) if prompts else captions


@torch.no_grad()
def validate_guidance(student: LatentDiffusion, teacher: LatentDiffusion, *, images: np.ndarray, captions: list[str],
                      prompts: tuple[str, ...], w_set: tuple[float, ...], step: int, out: Path) -> dict:
    """Distillation error over (t grid x w set) and a sample grid at the largest w (module docstring)."""
    z0 = teacher.encode_images(images).float()
    cond, uncond = teacher.encode_prompt(captions), teacher.empty_cond(len(captions))
    noise = initial_noise(z0.shape[1:], range(SEED, SEED + len(z0)), z0.device)
    errors = []
    for t in T_GRID:
        x_t = teacher.schedule.add_noise(z0, noise, torch.full((len(z0),), t, device=z0.device))
        for w in w_set:
            target = guided_eps(teacher.eps_fn(), w, uncond=uncond)(x_t.to(teacher.dtype), t, cond)
            errors.append(float(l2(student.eps_fn(guidance=w)(x_t.to(student.dtype), t, cond).float(),
                                   target.float())))
    texts = _prompts(captions, prompts)
    start = initial_noise(z0.shape[1:], range(SEED, SEED + len(texts)), z0.device).to(student.dtype)
    x = ddim_loop(student.eps_fn(guidance=max(w_set)), start, student.encode_prompt(texts),
                  generation_timesteps(SAMPLE_STEPS), schedule=student.schedule).final
    samples = to_uint8(student.decode_latents(x))
    save_image(grid([images, samples] if len(texts) == len(images) else [samples]),
               out / "validation" / f"step-{step:06d}.png")
    row = {"step": step, "guidance_error": round(float(np.mean(errors)), 6)}
    _append_row(out / "validation.csv", row)
    return row


@torch.no_grad()
def validate_icd(model: LatentDiffusion, boundaries: Boundaries, *, images: np.ndarray, captions: list[str],
                 prompts: tuple[str, ...], w: float, tau: float, step: int, out: Path | None,
                 reverse_adapter: bool = True) -> dict:
    """Reconstruction PSNR of forward + reverse inversion and a sample grid (module docstring); `out` None computes
    the row and writes nothing (a sharded run's other processes). reverse_adapter False: the model's own network
    decodes, unguided (ICDConfig.reverse = "model")."""

    def reverse(guidance: float, tau: float | None = None):
        if not reverse_adapter:
            return model.eps_fn()
        return model.eps_fn(adapter=lora.REVERSE, guidance=guidance, tau=tau)

    z0 = model.encode_images(images).to(model.dtype)
    cond = model.encode_prompt(captions)
    noise = initial_noise(z0.shape[1:], range(SEED, SEED + len(z0)), z0.device).to(model.dtype)
    latent = icd_invert(model.eps_fn(adapter=lora.FORWARD), z0, cond, boundaries, schedule=model.schedule,
                        noise=noise)[1][-1]
    recon = to_uint8(model.decode_latents(icd_decode(reverse(0.0), latent, cond, boundaries, schedule=model.schedule)))
    texts = _prompts(captions, prompts)
    start = initial_noise(z0.shape[1:], range(SEED, SEED + len(texts)), z0.device).to(model.dtype)
    samples = to_uint8(model.decode_latents(icd_decode(reverse(w, tau), start, model.encode_prompt(texts),
                                                       boundaries, schedule=model.schedule)))
    row = {"step": step, "psnr": round(float(psnr(recon, images).mean()), 3)}
    if out is None:
        return row
    rows = [images, recon] + ([samples] if len(texts) == len(images) else [])
    save_image(grid(rows), out / "validation" / f"step-{step:06d}.png")
    if len(texts) != len(images):
        save_image(grid([samples]), out / "validation" / f"step-{step:06d}-samples.png")
    _append_row(out / "validation.csv", row)
    return row
