"""Training data: cached renders of the shapes world, and per-step random generators for exact resume."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from icd import world

log = logging.getLogger(__name__)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream).

    Every random draw of training step `step` comes from here, so a resumed run repeats an uninterrupted one
    exactly without saving RNG state.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


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
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, images=images, captions=np.array(json.dumps(captions)))
        tmp.replace(path)
    return images, captions


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
