"""Batches of real image–caption data for the trainers: a pure function of (seed, step, process), so a resumed or
re-launched run reads exactly the examples an uninterrupted one would.

Map-style sources (`icd.train.sources.TableSource`): one global stream over the dataset, a fresh permutation per
epoch; global batch `step` holds stream positions ``step * B .. step * B + B - 1`` and process `rank` takes rows
``rank::world``. Every example is read once per epoch by exactly one process, and the rows a process trains on do
not depend on how many processes there are (two processes give the same update as one).

Webdataset shards (`ShardSource`): process `rank` streams shards ``rank::world`` (so it needs at least as many
shards as processes), in a per-epoch shard order with a per-epoch sample order inside each shard; its position
after `step` steps is ``step * local_batch``, found again from the tar headers on resume.

Preprocessing: resize the shorter side to `resolution`, then a centre crop (or a random crop, drawn per row). With
`caption_dropout` p a row's caption becomes "" (classifier-free guidance). An unreadable image is replaced by the
next readable example of the stream (skipped and counted, never fatal mid-run).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from icd.imageio import to_tensor
from icd.runtime import step_generator
from icd.train.sources import BadImage, DataError, ShardSource, TableSource

log = logging.getLogger(__name__)

PERMUTATION_STREAM = 101  # step_generator streams of the data (the trainers' own draws use stream 0)
ROW_STREAM = 102
MAX_RETRIES = 64  # consecutive unreadable examples before the run stops


def crop_square(im: Image.Image, resolution: int, offset: tuple[float, float] | None = None) -> np.ndarray:
    """Shorter side resized to `resolution`, then a `resolution`² crop: centred, or at fractional `offset`
    (u, v) in [0, 1) of the free range (random crop). uint8 [H, W, 3]."""
    scale = resolution / min(im.size)
    size = (max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC) if im.size != size else im
    free_x, free_y = im.width - resolution, im.height - resolution
    u, v = offset if offset is not None else (0.5, 0.5)
    left = min(int(u * (free_x + 1)), free_x) if offset is not None else free_x // 2
    top = min(int(v * (free_y + 1)), free_y) if offset is not None else free_y // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


@dataclass
class Examples:
    """One process's rows of one step: uint8 images [n, H, W, 3], captions (after dropout), identities."""

    images: np.ndarray
    captions: list[str]
    keys: list[str]


class BatchReader:
    def __init__(self, source: TableSource | ShardSource, *, resolution: int, global_batch: int, seed: int,
                 rank: int = 0, world: int = 1, random_crop: bool = False, caption_dropout: float = 0.0):
        self.source, self.resolution, self.batch_size, self.seed = source, resolution, global_batch, seed
        self.rank, self.world, self.random_crop, self.caption_dropout = rank, world, random_crop, caption_dropout
        self.rows = list(range(rank, global_batch, world))  # this process's rows of every global batch
        self.bad: set[str] = set()  # identities of the unreadable examples met so far
        self._perm: tuple[int, torch.Tensor] | None = None  # (epoch, permutation) of a table
        self._order: tuple[int, list[Path]] | None = None  # (epoch, shard order) of this process's shards
        self._keys: tuple[int, Path, list[str]] | None = None  # (epoch, shard, its key order)
        if isinstance(source, ShardSource):
            if len(source.shards) < world:
                raise DataError(f"{source.description}: {len(source.shards)} shard(s) for {world} processes; "
                                "each process streams its own shards, so give at least one per process")
            self.shards = source.shards[rank::world]
            self.sizes = {s: len(source.samples(s)) for s in self.shards}  # headers only
            self.epoch_size = sum(self.sizes.values())
            if self.epoch_size == 0:
                raise DataError(f"{source.description}: process {rank}'s shards hold no image samples")
        elif len(source) == 0:
            raise DataError(f"{source.description}: the dataset is empty")

    # ----------------------------------------------------------------------------------- stream positions
    def _table_index(self, position: int) -> int:
        n = len(self.source)
        epoch = position // n
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, torch.randperm(n, generator=step_generator(self.seed, epoch, PERMUTATION_STREAM)))
        return int(self._perm[1][position % n])

    def _shard_order(self, epoch: int) -> list[Path]:
        """This process's shards in epoch `epoch`'s order (cached for the epoch)."""
        if self._order is None or self._order[0] != epoch:
            gen = step_generator(self.seed, epoch, PERMUTATION_STREAM + 1000 * (1 + self.rank))
            self._order = (epoch, [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()])
        return self._order[1]

    def _shard_keys(self, epoch: int, shard: Path) -> list[str]:
        """`shard`'s sample keys in epoch `epoch`'s order (cached for the shard being read)."""
        if self._keys is None or self._keys[:2] != (epoch, shard):
            keys = self.source.samples(shard)
            gen = step_generator(self.seed, epoch, PERMUTATION_STREAM + 7919 * (1 + self.source.shards.index(shard)))
            self._keys = (epoch, shard, [keys[i] for i in torch.randperm(len(keys), generator=gen).tolist()])
        return self._keys[2]

    def _shard_sample(self, position: int) -> tuple[Path, str]:
        epoch, offset = divmod(position, self.epoch_size)
        for shard in self._shard_order(epoch):
            if offset < self.sizes[shard]:
                return shard, self._shard_keys(epoch, shard)[offset]
            offset -= self.sizes[shard]
        raise AssertionError("position beyond the epoch")  # unreachable: offset < epoch_size

    def _locate(self, position: int) -> tuple[tuple[Path, str] | int, str]:
        """(where the example at `position` is, its identity)."""
        if isinstance(self.source, ShardSource):
            shard, key = self._shard_sample(position)
            return (shard, key), f"{shard.name}:{key}"
        i = self._table_index(position)
        return i, self.source.keys[i] if self.source.keys else str(i)

    def _read_good(self, position: int, stride: int) -> tuple[Image.Image, str, str]:
        """The example at `position`, or the first readable one after it (every `stride`-th position); unreadable
        examples are remembered (`bad`, counted once each) and never decoded again."""
        for attempt in range(MAX_RETRIES):
            where, key = self._locate(position + attempt * stride)
            if key in self.bad:
                continue
            try:
                if isinstance(where, tuple):
                    image, caption = self.source.read(*where)
                else:
                    image, caption = self.source.image(where), self.source.captions[where]
                return image, caption, key
            except BadImage as e:
                if len(self.bad) < 5:
                    log.warning("skipping an unreadable image: %s", e)
                self.bad.add(key)
        raise DataError(f"{self.source.description}: {MAX_RETRIES} unreadable images in a row near stream position "
                        f"{position}; check the dataset")

    @property
    def skipped_total(self) -> int:
        """Distinct unreadable examples met so far by this process."""
        return len(self.bad)

    # ------------------------------------------------------------------------------------------- batches
    def batch(self, step: int) -> Examples:
        """This process's rows of global batch `step` (see the module docstring)."""
        if isinstance(self.source, ShardSource):  # the process's own stream, and its own crop / dropout draws
            n = len(self.rows)
            positions, stride, rows = [step * n + j for j in range(n)], 1, list(range(n))
            gen = step_generator(self.seed, step, ROW_STREAM + 1 + self.rank)
        else:  # global draws, so a row's crop and dropout do not depend on the process count
            n = self.batch_size
            positions, stride, rows = [step * n + r for r in self.rows], n, self.rows
            gen = step_generator(self.seed, step, ROW_STREAM)
        offsets = torch.rand((n, 2), generator=gen)
        drop = torch.rand(n, generator=gen) < self.caption_dropout
        images, captions, keys = [], [], []
        for row, position in zip(rows, positions):
            image, caption, key = self._read_good(position, stride)
            offset = tuple(offsets[row].tolist()) if self.random_crop else None
            images.append(crop_square(image, self.resolution, offset))
            captions.append("" if bool(drop[row]) else caption)
            keys.append(key)
        return Examples(np.stack(images), captions, keys)


class LatentEncoder:
    """Images -> clean latents z0 = VAE posterior mean × scaling factor, optionally cached on disk per example
    (one small safetensors file per key, written atomically; only for centre crops, which are the same every time).
    """

    def __init__(self, model, *, cache_dir: str | Path | None = None, identity: str = ""):
        self.model = model
        self.cache = None
        if cache_dir is not None:
            digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
            self.cache = Path(cache_dir) / f"latents-{digest}"

    def _path(self, key: str) -> Path:
        h = hashlib.sha1(key.encode()).hexdigest()
        return self.cache / h[:2] / f"{h}.safetensors"

    @torch.no_grad()
    def __call__(self, examples: Examples) -> torch.Tensor:
        n = len(examples.keys)
        out: list[torch.Tensor | None] = [None] * n
        if self.cache is not None:
            for i, key in enumerate(examples.keys):
                path = self._path(key)
                if path.is_file():
                    out[i] = load_file(str(path))["z0"]
        todo = [i for i in range(n) if out[i] is None]
        if todo:
            vae = self.model.vae
            x = to_tensor(examples.images[todo]).to(device=vae.device, dtype=vae.dtype)
            z = (vae.encode(x).latent_dist.mean.float() * vae.config.scaling_factor).cpu().contiguous()
            for j, i in enumerate(todo):
                out[i] = z[j]
                if self.cache is not None:
                    path = self._path(examples.keys[i])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                    save_file({"z0": z[j].clone()}, str(tmp))
                    tmp.replace(path)
        return torch.stack(out)
