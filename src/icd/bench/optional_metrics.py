"""Metrics that need pretrained weights: LPIPS, CLIP-T / CLIP-I and DINO, computed only from local files.

Nothing is ever downloaded: each metric is built from a path the user gives (``HF_HUB_OFFLINE=1`` and
``local_files_only=True``). A metric whose weights are not given, missing or unusable is not computed at all; it is
reported as a `Skipped` entry with a one-line reason (never a placeholder zero, never an exception).

* ``lpips`` (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"): AlexNet
  features + LPIPS v0.1 linear layers, re-implemented here in plain torch from a weights file.
* ``clip_t`` / ``clip_i`` (CLIPScore: Hessel et al. 2021; CLIP: Radford et al. 2021): image-text and image-image
  cosine similarity of CLIP embeddings from a local transformers ``CLIPModel`` folder.
* ``dino`` (DINOv2: Oquab et al. 2023; DINO score as in DreamBooth, Ruiz et al. 2023): cosine similarity of CLS
  embeddings from a local transformers ``AutoModel`` folder.

All image inputs are uint8 RGB batches ``[N, H, W, 3]`` (numpy); every metric returns float64 ``[N]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from icd.bench.lpips import BATCH, LPIPS, _check_images, _load_lpips_weights, _one_line  # noqa: F401

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing (Radford et al. 2021)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NO_LPIPS = "no weights given (--lpips PATH: AlexNet + LPIPS v0.1 linear layers)"
NO_CLIP = "no model given (--clip DIR: a local transformers CLIP folder with its tokenizer)"
NO_DINO = "no model given (--dino DIR: a local transformers DINOv2 folder, e.g. facebook/dinov2-base)"


@dataclass(frozen=True)
class Skipped:
    """A metric that was not computed, and why (one line, shown to the user)."""

    metric: str
    reason: str


class OptionalMetric(Protocol):
    """A loaded metric: ``name`` plus a call returning one float per image (``[N]``)."""

    name: str

    def __call__(self, *args: Any) -> np.ndarray: ...


def _cosine(u: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(u.double(), v.double(), dim=-1).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------- LPIPS


# ------------------------------------------------------------------------------------------- image preprocessing


@dataclass(frozen=True)
class Preprocess:
    """Resize (PIL, shortest edge or fixed size) -> center crop -> [0, 1] -> normalise, as HF image processors do."""

    resize: int | tuple[int, int] | None  # int: shortest edge; (h, w): exact size; None: keep
    crop: tuple[int, int] | None  # (h, w) center crop, or None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL.Image.BICUBIC

    @classmethod
    def from_folder(cls, folder: Path, default: Preprocess) -> Preprocess:
        """The recipe of `folder`'s ``preprocessor_config.json`` (HF image processor keys), else `default`."""
        file = folder / "preprocessor_config.json"
        if not file.is_file():
            return default
        cfg = json.loads(file.read_text())
        size = cfg.get("size")
        if not cfg.get("do_resize", True):
            resize = None
        elif size is None:
            resize = default.resize
        elif isinstance(size, dict) and "shortest_edge" in size:
            resize = int(size["shortest_edge"])
        elif isinstance(size, dict):
            resize = (int(size["height"]), int(size["width"]))
        else:
            resize = int(size)
        crop_cfg = cfg.get("crop_size")
        if not cfg.get("do_center_crop", True):
            crop = None
        elif crop_cfg is None:
            crop = default.crop
        elif isinstance(crop_cfg, dict):
            crop = (int(crop_cfg["height"]), int(crop_cfg["width"]))
        else:
            crop = (int(crop_cfg), int(crop_cfg))
        return cls(resize=resize, crop=crop, mean=tuple(cfg.get("image_mean", default.mean)),
                   std=tuple(cfg.get("image_std", default.std)), resample=int(cfg.get("resample", default.resample)))

    def _one(self, image: np.ndarray) -> np.ndarray:
        from PIL import Image  # resizing for the optional image metrics only

        h, w = image.shape[:2]
        if isinstance(self.resize, int):
            short, long = (h, w) if h <= w else (w, h)
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if h <= w else (new_long, new_short)
        else:
            size = self.resize
        if size is not None and size != (h, w):
            image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample=self.resample))
        if self.crop is not None:
            h, w = image.shape[:2]
            ch, cw = self.crop
            if ch > h or cw > w:  # HF pads before cropping; an upsampling resize avoids that, so refuse instead
                raise ValueError(f"crop {self.crop} larger than the resized image {(h, w)}")
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image[top : top + ch, left : left + cw]
        return image

    def __call__(self, images: np.ndarray, device: torch.device) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` -> normalised float32 ``[N, 3, h, w]`` pixel values on `device`."""
        batch = np.stack([self._one(np.ascontiguousarray(img, dtype=np.uint8)) for img in images])
        x = torch.as_tensor(batch, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(device)


# ----------------------------------------------------------------------------------------------------------- CLIP


def _from_pretrained(cls: Any, folder: Path) -> torch.nn.Module:
    """``cls.from_pretrained(folder, local_files_only=True)`` in eval mode; refuses partially random weights."""
    model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{len(missing)} weights missing from the checkpoint (e.g. {missing[0]})")
    return model.eval()


class _ClipModel:
    """A local CLIP model and its preprocessing, shared by `ClipText` and `ClipImage`."""

    def __init__(self, folder: Path, device: str | torch.device) -> None:
        from transformers import CLIPModel  # heavy, and only when CLIP weights are given

        self.device = torch.device(device)
        self.model = _from_pretrained(CLIPModel, folder).to(self.device)
        size = int(self.model.config.vision_config.image_size)
        # no preprocessor_config.json: OpenAI CLIP's recipe (shorter side -> image_size, center crop, CLIP mean/std)
        self.preprocess = Preprocess.from_folder(folder, Preprocess(size, (size, size), CLIP_MEAN, CLIP_STD))
        self.tokenizer = None

    @torch.inference_mode()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """Projected image embeddings ``[N, D]`` (visual projection of the pooled CLS token)."""
        out = []
        for i in range(0, len(images), BATCH):
            pixels = self.preprocess(images[i : i + BATCH], self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(self.model.visual_projection(pooled))
        return torch.cat(out)

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings ``[N, D]`` (text projection of the pooled end-of-text token)."""
        assert self.tokenizer is not None
        max_len = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        out = []
        for i in range(0, len(prompts), BATCH):
            tokens = self.tokenizer(list(prompts[i : i + BATCH]), padding=True, truncation=True, max_length=max_len,
                                    return_tensors="pt").to(self.device)
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(self.model.text_projection(pooled))
        return torch.cat(out)


class ClipText:
    """CLIP-T: 100 x cosine(image embedding, prompt embedding) per image (Hessel et al. 2021, CLIPScore).

    Reported x100 without CLIPScore's clamp at 0 and its 2.5 rescaling, as editing papers usually report CLIP-T.
    """

    name = "clip_t"

    def __init__(self, clip: _ClipModel) -> None:
        self.clip = clip

    def __call__(self, images: np.ndarray, prompts: str | Sequence[str]) -> np.ndarray:
        """Per-image CLIP-T of `images` ``[N, H, W, 3]`` against `prompts` (N strings, or one for all)."""
        (images,) = _check_images(images)
        prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return 100.0 * _cosine(self.clip.image_embeddings(images), self.clip.text_embeddings(prompts))


class ClipImage:
    """CLIP-I: cosine similarity of the CLIP image embeddings of `a` and `b` (Radford et al. 2021), in [-1, 1]."""

    name = "clip_i"

    def __init__(self, clip: _ClipModel) -> None:
        self.clip = clip

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _check_images(a, b)
        return _cosine(self.clip.image_embeddings(a), self.clip.image_embeddings(b))


def _load_clip(folder: str, device: str | torch.device) -> tuple[dict[str, Callable], list[Skipped]]:
    path = Path(folder).expanduser()
    if not path.is_dir():
        reason = f"model folder not found: {path}"
        return {}, [Skipped("clip_t", reason), Skipped("clip_i", reason)]
    try:
        clip = _ClipModel(path, device)
    except Exception as error:  # unusable folder -> Skipped, never a crash
        reason = f"cannot load CLIP from {path}: {_one_line(error)}"
        return {}, [Skipped("clip_t", reason), Skipped("clip_i", reason)]
    metrics: dict[str, Callable] = {"clip_i": ClipImage(clip)}
    try:
        from transformers import AutoTokenizer  # heavy, and only when CLIP weights are given

        clip.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        return metrics, [Skipped("clip_t", f"no usable tokenizer in {path}: {_one_line(error)}")]
    metrics["clip_t"] = ClipText(clip)
    return metrics, []


# ----------------------------------------------------------------------------------------------------------- DINO


class Dino:
    """DINO score: cosine similarity of the CLS embeddings of `a` and `b` (DINOv2, Oquab et al. 2023), in [-1, 1].

    The CLS embedding is the model's ``pooler_output`` (DINOv2: the layer-normed CLS token), else the first token of
    ``last_hidden_state``. Preprocessing follows the folder's ``preprocessor_config.json`` (facebook/dinov2-*: resize
    the shorter side to 256, center crop 224); without one, images are resized to the config's ``image_size``. Both
    use ImageNet mean/std unless the file says otherwise.
    """

    name = "dino"

    def __init__(self, folder: Path, device: str | torch.device) -> None:
        from transformers import AutoModel  # heavy, and only when DINOv2 weights are given

        self.device = torch.device(device)
        self.model = _from_pretrained(AutoModel, folder).to(self.device)
        size = getattr(self.model.config, "image_size", None)
        if size is None:
            raise ValueError(f"{type(self.model).__name__} config has no image_size (not a vision model)")
        size = int(size)
        self.preprocess = Preprocess.from_folder(folder, Preprocess((size, size), None, IMAGENET_MEAN, IMAGENET_STD))

    @torch.inference_mode()
    def embeddings(self, images: np.ndarray) -> torch.Tensor:
        """CLS embeddings ``[N, D]``."""
        out = []
        for i in range(0, len(images), BATCH):
            result = self.model(pixel_values=self.preprocess(images[i : i + BATCH], self.device))
            pooled = getattr(result, "pooler_output", None)
            out.append(pooled if pooled is not None else result.last_hidden_state[:, 0])
        return torch.cat(out)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _check_images(a, b)
        return _cosine(self.embeddings(a), self.embeddings(b))


def _load_dino(folder: str, device: str | torch.device) -> tuple[dict[str, Callable], list[Skipped]]:
    path = Path(folder).expanduser()
    if not path.is_dir():
        return {}, [Skipped("dino", f"model folder not found: {path}")]
    try:
        dino = Dino(path, device)
        dino.embeddings(np.zeros((1, 32, 32, 3), np.uint8))  # dry run: a folder of the wrong kind fails here
    except Exception as error:  # unusable folder -> Skipped, never a crash
        return {}, [Skipped("dino", f"cannot load DINO from {path}: {_one_line(error)}")]
    return {"dino": dino}, []


# ------------------------------------------------------------------------------------------------------ entry point


def load_optional_metrics(
    *,
    lpips: str | None = None,
    clip: str | None = None,
    dino: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Callable], list[Skipped]]:
    """Build the weight-dependent metrics whose local weights are given; the rest become `Skipped` entries.

    lpips: a ``.safetensors`` (or ``.pth``) file with AlexNet ``features.{0,3,6,8,10}.{weight,bias}`` and LPIPS v0.1
        ``lin{0..4}.model.1.weight``, or a comma-separated pair of files holding the two sets.
    clip: a local transformers CLIP folder (``CLIPModel`` + tokenizer; ``preprocessor_config.json`` optional).
    dino: a local transformers folder for ``AutoModel`` (DINOv2).

    Returns ``({name: metric}, skipped)`` with names among ``lpips``, ``clip_t``, ``clip_i``, ``dino``; calls are
    ``lpips(a, b)``, ``clip_i(a, b)``, ``dino(a, b)`` and ``clip_t(images, prompts)``, each giving float64 ``[N]``.
    Never downloads, never raises for missing or invalid weights.
    """
    metrics: dict[str, Callable] = {}
    skipped: list[Skipped] = []
    if not lpips:
        skipped.append(Skipped("lpips", NO_LPIPS))
    else:
        weights = _load_lpips_weights(lpips)
        if isinstance(weights, str):
            skipped.append(Skipped("lpips", weights))
        else:
            metrics["lpips"] = LPIPS(weights, device)
    if not clip:
        skipped += [Skipped("clip_t", NO_CLIP), Skipped("clip_i", NO_CLIP)]
    else:
        found, missed = _load_clip(clip, device)
        metrics.update(found)
        skipped += missed
    if not dino:
        skipped.append(Skipped("dino", NO_DINO))
    else:
        found, missed = _load_dino(dino, device)
        metrics.update(found)
        skipped += missed
    return metrics, skipped
