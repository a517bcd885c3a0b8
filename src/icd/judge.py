"""The judge: a small CNN that reads a world image and reports its background and objects.

It is our stand-in for a CLIP score: a generated or edited image is scored by whether the judge's reading matches
the caption exactly (background, and the set of (size, colour, shape) objects).

Heads:
- ``background``: softmax over the world's backgrounds (global average pooling);
- ``count``: softmax over 1..MAX_OBJECTS objects (global average and max pooling);
- ``objects``: one logit per (size, colour, shape) combination from a 1x1 convolution, max-pooled over space, so
  each location votes for the object it sees (attribute binding stays local).

The reading takes the ``count`` most likely objects. Trained with heavy degradation (noise, blur, tint, contrast,
resampling), because generated images are never clean renders (embedded-notes.md, pitfall 3).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from icd import world
from icd.imageio import to_tensor
from icd.paths import embedded_judge_path

MAX_OBJECTS = 3
COMBOS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(world.SIZES, world.COLORS, world.SHAPES))
COMBO_INDEX = {c: i for i, c in enumerate(COMBOS)}
BACKGROUND_LIST = tuple(world.BACKGROUNDS)


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2),  # 32x32
            _block(w, 2 * w, 1),
            _block(2 * w, 3 * w, 2),  # 16x16
            _block(3 * w, 3 * w, 1),
            _block(3 * w, 3 * w, 1),
        )
        self.objects = nn.Conv2d(3 * w, len(COMBOS), 1)
        self.background = nn.Linear(3 * w, len(BACKGROUND_LIST))
        self.count = nn.Linear(6 * w, MAX_OBJECTS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: float [B, 3, 64, 64] in [-1, 1] -> logits per head."""
        h = self.features(x)  # (B, 3w, 16, 16)
        avg, mx = h.mean(dim=(2, 3)), h.amax(dim=(2, 3))
        return {
            "objects": self.objects(h).amax(dim=(2, 3)),  # (B, n_combos)
            "background": self.background(avg),  # (B, n_backgrounds)
            "count": self.count(torch.cat([avg, mx], dim=1)),  # (B, MAX_OBJECTS)
        }


def targets(attrs: list[world.SceneAttributes]) -> dict[str, torch.Tensor]:
    objects = torch.zeros(len(attrs), len(COMBOS))
    for i, a in enumerate(attrs):
        for o in a.objects:
            objects[i, COMBO_INDEX[o]] = 1.0
    return {
        "objects": objects,
        "background": torch.tensor([BACKGROUND_LIST.index(a.background) for a in attrs]),
        "count": torch.tensor([len(a.objects) - 1 for a in attrs]),
    }


def judge_loss(logits: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    obj = F.binary_cross_entropy_with_logits(logits["objects"], tgt["objects"]) * len(COMBOS) / 4
    bg = F.cross_entropy(logits["background"], tgt["background"])
    cnt = F.cross_entropy(logits["count"], tgt["count"])
    return {"loss": obj + bg + cnt, "objects": obj, "background": bg, "count": cnt}


def decode(logits: dict[str, torch.Tensor]) -> list[world.SceneAttributes]:
    """Logits -> the judge's reading of each image."""
    out = []
    counts = logits["count"].argmax(1) + 1
    order = logits["objects"].argsort(dim=1, descending=True)
    for i in range(len(counts)):
        objs = tuple(sorted(COMBOS[j] for j in order[i, : int(counts[i])].tolist()))
        out.append(world.SceneAttributes(BACKGROUND_LIST[int(logits["background"][i].argmax())], objs))
    return out


def degrade(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Random degradations of a batch in [-1, 1]: blur, resampling, tint, contrast, noise (per sample)."""
    b = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand((b, *shape), generator=generator)

    # blur: mix with a 3x3 / 5x5 box blur
    k3 = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    k5 = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)
    a, c = u(0, 0.8 * strength, 1, 1, 1), u(0, 0.5 * strength, 1, 1, 1)
    x = (1 - a - c).clamp(min=0) * x + a * k3 + c * k5
    # down-up resampling for a third of the batch
    low = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False), scale_factor=2.0,
                        mode="bilinear", align_corners=False)
    pick = (torch.rand(b, 1, 1, 1, generator=generator) < 0.33 * strength).float()
    x = pick * low + (1 - pick) * x
    # tint, brightness, contrast
    gain = 1 + u(-0.15, 0.15, 3, 1, 1) * strength
    offset = u(-0.12, 0.12, 3, 1, 1) * strength
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + u(-0.25, 0.15, 1, 1, 1) * strength
    x = (x - mean) * contrast + mean
    x = x * gain + offset
    # pixel noise and low-frequency blotches
    x = x + u(0, 0.12, 1, 1, 1) * strength * torch.randn(x.shape, generator=generator)
    blotch = F.interpolate(torch.randn((b, 3, 4, 4), generator=generator), size=x.shape[-2:], mode="bilinear",
                           align_corners=False)
    x = x + u(0, 0.08, 1, 1, 1) * strength * blotch
    return x.clamp(-1, 1)


class JudgeScorer:
    """Loaded judge: ``read(images)`` and ``accuracy(images, captions)``."""

    def __init__(self, model: Judge):
        self.model = model.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> JudgeScorer:
        path = Path(path) if path is not None else embedded_judge_path()
        state = load_file(str(path))
        model = Judge()
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return cls(model)

    @torch.no_grad()
    def read(self, images: torch.Tensor | np.ndarray, batch: int = 256) -> list[world.SceneAttributes]:
        """images: uint8 [N,H,W,3] array or float [N,3,H,W] tensor in [-1, 1]."""
        if isinstance(images, np.ndarray):
            images = to_tensor(images)
        out = []
        for i in range(0, len(images), batch):
            out += decode(self.model(images[i : i + batch].float()))
        return out

    def score(self, images, captions: list[str]) -> dict[str, float]:
        """Exact-caption accuracy and per-attribute accuracies of `images` against `captions`."""
        readings = self.read(images)
        return attribute_accuracy(readings, [world.parse_caption(c) for c in captions])


def attribute_accuracy(readings: list[world.SceneAttributes], truths: list[world.SceneAttributes]) -> dict:
    n = len(truths)
    exact = sum(r == t for r, t in zip(readings, truths))
    bg = sum(r.background == t.background for r, t in zip(readings, truths))
    count = sum(len(r.objects) == len(t.objects) for r, t in zip(readings, truths))
    per = {"size": 0, "color": 0, "shape": 0}
    n_obj = 0
    for r, t in zip(readings, truths):  # an attribute is right when some read object shares it with the truth
        for obj in t.objects:
            n_obj += 1
            for k, name in enumerate(("size", "color", "shape")):
                per[name] += any(o[k] == obj[k] for o in r.objects)
    objects = sum(r.objects == t.objects for r, t in zip(readings, truths))
    return {
        "n": n,
        "exact": exact / n,
        "background": bg / n,
        "count": count / n,
        "objects": objects / n,
        **{k: v / max(n_obj, 1) for k, v in per.items()},
    }
