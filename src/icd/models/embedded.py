"""Loading models: the embedded tiny model shipped in the package, or any diffusers latent-diffusion folder.

`load_model("embedded")` needs no download. `load_model(<folder>)` loads a diffusers `StableDiffusionPipeline`
layout (tokenizer, text_encoder, vae, unet, scheduler) from disk; Stable Diffusion 1.5 / SDXL adapters and hub ids
plug in here later.

`load_icd_model(...)` loads the guidance-distilled UNet (``unet_guidance/``) with the two iCD adapters (``icd/``:
``rev_cd.safetensors``, ``fwd_cd.safetensors``, ``adapters.json``) and exposes their boundaries and tau as
``model.icd``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from icd.boundaries import Boundaries
from icd.models import lora
from icd.models.base import LatentDiffusion
from icd.models.tiny import VOCABULARY_FILE
from icd.paths import EMBEDDED, embedded_model_path
from icd.schedule import NoiseSchedule

GUIDANCE_UNET = "unet_guidance"  # subfolder of the guidance-distilled UNet (docs/method.md §6)
ADAPTERS_SUBFOLDER = "icd"  # subfolder of the iCD adapters inside a pipeline folder


class ModelError(ValueError):
    """A model folder that is missing, incomplete or of an unsupported kind."""


def _first_line(e: BaseException) -> str:
    """The first line of a library's (often multi-line) error message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    path = resolve_model_path(name_or_path)
    classes = json.loads((path / "model_index.json").read_text())
    if classes.get("_class_name") not in ("StableDiffusionPipeline", None):
        raise ModelError(f"unsupported pipeline {classes.get('_class_name')!r} in {path} "
                         "(expected StableDiffusionPipeline)")
    try:  # weights from safetensors only: a downloaded folder's pickles are never unpickled
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(path / unet_subfolder, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"cannot load the model in {path}: {_first_line(e)}") from None
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config)
    vocabulary_file = path / VOCABULARY_FILE  # a closed-vocabulary model: prompts are checked against it
    vocabulary = json.loads(vocabulary_file.read_text()) if vocabulary_file.is_file() else None
    image_size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return LatentDiffusion(
        tokenizer=tokenizer, text_encoder=text_encoder.to(device), vae=vae.to(device), unet=unet.to(device),
        schedule=schedule, name=str(name_or_path), image_size=image_size, vocabulary=vocabulary,
    )


@dataclass(frozen=True)
class ICDSpec:
    """What a pair of trained iCD adapters needs at inference: their boundaries and recommended tau."""

    path: Path
    boundaries: Boundaries
    tau: float | None
    w_set: tuple[float, ...]


def load_icd_model(name_or_path: str | Path = EMBEDDED, *, adapters: str | Path | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   fuse: bool = True) -> LatentDiffusion:
    """The guidance-distilled model with both iCD adapters attached (`adapters` default: ``<model>/icd``).

    fuse: fold each adapter into its own copy of the weights it modifies (`icd.models.lora.FusedAdapters`), so an
    iCD step costs one plain UNet call (about 2x faster on the embedded model); False keeps peft's LoRA branches
    (less memory: no extra weight copies)."""
    path = resolve_model_path(name_or_path)
    folder = Path(adapters) if adapters is not None else path / ADAPTERS_SUBFOLDER
    meta_file = folder / "adapters.json"
    if not meta_file.is_file():
        raise ModelError(f"no iCD adapters at {folder} (adapters.json missing); train them with `icd train icd` "
                         "or pass --adapters DIR")
    if not (path / GUIDANCE_UNET).is_dir():
        raise ModelError(f"model folder {path} has no guidance-distilled UNet ({GUIDANCE_UNET}/); "
                         "run `icd train guidance`")
    model = load_model(name_or_path, device=device, dtype=dtype, unet_subfolder=GUIDANCE_UNET)
    try:
        meta = lora.attach_adapters(model.unet, folder)
        boundaries = Boundaries(**meta["boundaries"])
    except (KeyError, TypeError, ValueError, OSError, RuntimeError) as e:
        raise ModelError(f"cannot load iCD adapters from {folder}: {_first_line(e)}") from None
    model.unet.to(device)
    if dtype != torch.float32:  # the LoRA weights were created in fp32
        model.unet.to(dtype=dtype)
    model.icd = ICDSpec(path=folder, boundaries=boundaries, tau=meta.get("tau"),
                        w_set=tuple(meta.get("w_set", ())))
    if fuse:
        model.fused = lora.FusedAdapters(model.unet)
    return model
