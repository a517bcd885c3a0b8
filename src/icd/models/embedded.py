"""Loading models: the embedded tiny model shipped in the package, or any diffusers latent-diffusion folder.

`load_model("embedded")` needs no download. `load_model(<folder>)` loads a diffusers `StableDiffusionPipeline`
layout (tokenizer, text_encoder, vae, unet, scheduler) from disk; Stable Diffusion 1.5 / SDXL adapters and hub ids
plug in here later.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from icd.models.base import LatentDiffusion
from icd.models.tiny import VOCABULARY_FILE
from icd.schedule import NoiseSchedule

EMBEDDED = "embedded"


def assets_dir() -> Path:
    return Path(str(resources.files("icd") / "assets"))


def embedded_model_path() -> Path:
    return assets_dir() / "embedded"


def embedded_judge_path() -> Path:
    return assets_dir() / "judge.safetensors"


class ModelError(ValueError):
    """A model folder that is missing, incomplete or of an unsupported kind."""


def resolve_model_path(name_or_path: str | Path) -> Path:
    path = embedded_model_path() if str(name_or_path) == EMBEDDED else Path(name_or_path)
    if not path.is_dir():
        hint = " (the embedded model is missing from this installation)" if str(name_or_path) == EMBEDDED else ""
        raise ModelError(f"model folder not found: {path}{hint}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelError(f"not a diffusers pipeline folder (no model_index.json): {path}")
    missing = [c for c in ("tokenizer", "text_encoder", "vae", "unet", "scheduler") if not (path / c).is_dir()]
    if missing:
        raise ModelError(f"model folder {path} lacks component(s): {', '.join(missing)}")
    return path


def load_model(name_or_path: str | Path = EMBEDDED, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, unet_subfolder: str = "unet") -> LatentDiffusion:
    """Load a latent diffusion model from a diffusers folder ("embedded" = the shipped tiny model)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_model_path(name_or_path)
    classes = json.loads((path / "model_index.json").read_text())
    if classes.get("_class_name") not in ("StableDiffusionPipeline", None):
        raise ModelError(f"unsupported pipeline {classes.get('_class_name')!r} in {path} "
                         "(expected StableDiffusionPipeline)")
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path / unet_subfolder, torch_dtype=dtype)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
    is_embedded = str(name_or_path) == EMBEDDED or (path / VOCABULARY_FILE).is_file()
    vocabulary = None
    if is_embedded:
        from icd.world import vocabulary as world_vocabulary

        vocabulary = world_vocabulary()
    image_size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return LatentDiffusion(
        tokenizer=tokenizer, text_encoder=text_encoder.to(device), vae=vae.to(device), unet=unet.to(device),
        schedule=schedule, name=str(name_or_path), image_size=image_size, vocabulary=vocabulary,
    )
