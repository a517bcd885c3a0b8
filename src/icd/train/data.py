"""Training data: cached renders of the shapes world, and per-step random generators for exact resume."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from icd import world
from icd.imageio import to_tensor
from icd.models.base import Cond

log = logging.getLogger(__name__)

CACHE = "cache"  # the renders and latents of a run, inside its out_dir (never shared with the runs beside it)


def world_dataset(n: int, *, seed_start: int = 0, max_objects: int = 2, cache_dir: str | Path | None = None):
    """Renders and captions of world seeds ``seed_start .. seed_start + n - 1``: (uint8 [N,64,64,3], captions)."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"world-{seed_start}-{n}-{max_objects}.npz"
        if path.is_file():
            data = np.load(path)
            return data["images"], json.loads(str(data["captions"]))
    images = np.empty((n, world.BASE_RES, world.BASE_RES, 3), dtype=np.uint8)
    captions = []
    for i in tqdm(range(n), desc="render world", unit="img", leave=False):
        scene = world.sample_scene(seed_start + i, max_objects=max_objects)
        images[i] = world.render(scene)
        captions.append(scene.caption)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")  # per process: concurrent ranks never collide
        np.savez(tmp, images=images, captions=np.array(json.dumps(captions)))
        tmp.replace(path)
    return images, captions


def file_digest(path: str | Path, length: int = 16) -> str:
    """Short sha256 of a file's bytes (cache keys that change when weights change)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


@torch.no_grad()
def encode_images(vae, images: np.ndarray, batch: int = 500) -> torch.Tensor:
    """uint8 renders -> clean latents z0 = posterior mean x scaling factor, contiguous float32.

    .contiguous(): oneDNN may return channels-last tensors, and a different memory format changes the rounding of
    later convolutions (a resumed run would then differ from an uninterrupted one).
    """
    out = []
    for i in tqdm(range(0, len(images), batch), desc="encode latents", leave=False):
        out.append(vae.encode(to_tensor(images[i : i + batch]).to(vae.dtype)).latent_dist.mean.float())
    return (torch.cat(out) * vae.config.scaling_factor).contiguous()


def world_latents(vae, vae_dir: str | Path, n: int, *, max_objects: int = 2, cache_dir: str | Path | None = None,
                  seed_start: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Latents and captions of world seeds ``seed_start ..`` encoded by `vae` (loaded from folder `vae_dir`).

    The cache is keyed by a digest of the VAE's weight file, so retrained weights never reuse stale latents.
    """
    vae_key = file_digest(next(Path(vae_dir).glob("*.safetensors")))
    images, captions = world_dataset(n, seed_start=seed_start, max_objects=max_objects, cache_dir=cache_dir)
    name = f"latents-{seed_start}-{n}-{max_objects}-{vae_key}.safetensors"
    path = None if cache_dir is None else Path(cache_dir) / name
    if path is not None and path.is_file():
        return load_file(str(path))["z0"], captions
    z = encode_images(vae, images)
    if path is not None:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # per process: concurrent ranks never collide
        save_file({"z0": z}, str(tmp))
        tmp.replace(path)
    return z, captions


@torch.no_grad()
def caption_conds(model, captions: list[str], chunk: int = 1000) -> Cond:
    """The conditioning of every caption (token embeddings (N, L, D), and the pooled embedding where the family has
    one), computed once before a training loop, on the CPU."""
    return Cond.cat([model.encode_prompt(captions[i : i + chunk]).to("cpu") for i in range(0, len(captions), chunk)])
