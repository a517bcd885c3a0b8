"""What a trainer reads each step: clean latents and their captions' conditioning for this process's rows.

- `WorldFeed` (``data = "world"``): world renders encoded once and indexed by the step's draws (the embedded
  model's recipe, unchanged);
- `RealFeed`: a real dataset (`icd.train.sources`) through `icd.train.batches.BatchReader`, encoded by the model's
  VAE each step (or read from the latent cache) and its text encoder(s) (SDXL: the pooled embedding too).

`open_data(cfg)` opens and checks the dataset before any model is loaded; `make_feed` builds the feed around the
loaded model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from icd.models.base import Cond, LatentDiffusion, PromptError
from icd.models.loading import resolve_model_path
from icd.train.batches import BatchReader, LatentEncoder, crop_square
from icd.train.config import ConfigError
from icd.train.data import CACHE, caption_conds, file_digest, world_dataset, world_latents
from icd.train.sources import BadImage, DataError, ShardSource, TableSource, open_source

log = logging.getLogger(__name__)
VALIDATION_SEED = 10_000_000  # world validation renders come from seeds no training set uses


def open_data(cfg) -> TableSource | ShardSource | None:
    """The config's dataset, opened and checked (None for the world); `DataError` in one line otherwise."""
    if cfg.data == "world":
        return None
    return open_source(cfg.data, cfg.data_format, caption_column=cfg.caption_column, image_column=cfg.image_column)


class WorldFeed:
    """Cached world latents and caption embeddings, indexed by the step's ``idx`` draws."""

    def __init__(self, model: LatentDiffusion, cfg, *, model_path: Path, out: Path):
        z_all, self.captions = world_latents(model.vae, model_path / "vae", cfg.n_images,
                                             max_objects=cfg.max_objects, cache_dir=out / CACHE)
        self.z_all, self.conds = z_all.cpu(), caption_conds(model, self.captions)
        self.n_data, self.latent_shape = len(self.z_all), tuple(self.z_all.shape[1:])
        self.skipped_total = 0

    def rows(self, step: int, idx: torch.Tensor, device) -> tuple[torch.Tensor, Cond]:
        idx = idx.cpu()
        return self.z_all[idx].to(device), self.conds.index(idx).to(device)

    def validation(self, n: int) -> tuple[np.ndarray, list[str]]:
        return world_dataset(n, seed_start=VALIDATION_SEED)


class RealFeed:
    """Latents and conditioning of this process's rows of global batch `step` (module docstring)."""

    def __init__(self, source: TableSource | ShardSource, model: LatentDiffusion, cfg, *, model_path: Path,
                 out: Path, rank: int, world: int):
        self.model, self.source = model, source
        self.resolution = cfg.resolution or model.image_size
        multiple = model.size_multiple or model.vae_factor
        if self.resolution % multiple:
            raise ConfigError(f"resolution {self.resolution} must be a multiple of {multiple} for {model.name}")
        if isinstance(source, TableSource) and model.vocabulary is not None:
            try:  # a closed-vocabulary model: every caption is checked before training, not mid-run
                model.check_prompts(source.captions)
            except PromptError as e:
                raise DataError(f"{source.description}: {e}") from None
        self.reader = BatchReader(source, resolution=self.resolution, global_batch=cfg.batch_size, seed=cfg.seed,
                                  rank=rank, world=world, random_crop=cfg.random_crop,
                                  caption_dropout=cfg.caption_dropout)
        vae_file = next(iter(sorted((model_path / "vae").glob("*.safetensors"))), None)
        identity = f"{source.description}|{self.resolution}|{file_digest(vae_file) if vae_file else model.name}"
        self.encoder = LatentEncoder(model, cache_dir=out / CACHE if cfg.latent_cache else None, identity=identity)
        self.n_data, self.latent_shape = 1, model.latent_shape(self.resolution, self.resolution)

    @property
    def skipped_total(self) -> int:
        return self.reader.skipped_total

    @torch.no_grad()
    def rows(self, step: int, idx: torch.Tensor, device) -> tuple[torch.Tensor, Cond]:
        """`idx` is ignored: the rows come from the data stream's position (a function of step and process)."""
        examples = self.reader.batch(step)
        return self.encoder(examples).to(device), self.model.encode_prompt(examples.captions)

    def validation(self, n: int) -> tuple[np.ndarray, list[str]]:
        """The first `n` readable examples in the dataset's own order, centre-cropped (the same every run)."""
        images, captions = [], []
        if isinstance(self.source, ShardSource):
            order = ((s, k) for s in self.source.shards for k in self.source.samples(s))
        else:
            order = iter(range(len(self.source)))
        for item in order:
            try:
                if isinstance(item, tuple):
                    image, caption = self.source.read(*item)
                else:
                    image, caption = self.source.image(item), self.source.captions[item]
            except BadImage:
                continue
            images.append(crop_square(image, self.resolution))
            captions.append(caption)
            if len(images) == n:
                break
        return np.stack(images), captions


def make_feed(source, model: LatentDiffusion, cfg, *, out: Path, rank: int = 0, world: int = 1
              ) -> WorldFeed | RealFeed:
    model_path = resolve_model_path(cfg.model)
    if source is None:
        return WorldFeed(model, cfg, model_path=model_path, out=out)
    return RealFeed(source, model, cfg, model_path=model_path, out=out, rank=rank, world=world)
