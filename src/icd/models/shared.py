"""Models around the modules of an already loaded diffusers pipeline (`icd.pipeline.Pipeline.from_diffusers`).

`from_modules(pipe)` wraps a `StableDiffusionPipeline` / `StableDiffusionXLPipeline` (or a subclass) without loading
anything of it again: its tokenizers, text encoders, VAE and UNet become a `LatentDiffusion` (`SDXLDiffusion`) on the
device and dtype its user put them, and a guidance-distilled UNet with the iCD adapters, where given, a second model
beside it that shares the text encoders, VAE and NFE counter (`LatentDiffusion.with_unet`). The modules are shared,
not copied: they are put in eval mode without gradients, and the adapters attach to the distilled UNet itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from icd.boundaries import Boundaries
from icd.models import sd15, sdxl
from icd.models.base import LatentDiffusion
from icd.models.loading import FAMILIES, GUIDANCE_UNET, ModelError, attach_icd, load_unet, unet_folder
from icd.models.tiny import VOCABULARY_FILE
from icd.schedule import NoiseSchedule


def pipeline_family(pipe):
    """The family module (`icd.models.sd15` / `icd.models.sdxl`) of a diffusers pipeline object, by its class or
    the first base class that is one of the two; ModelError otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    raise ModelError(f"Pipeline.from_diffusers takes a {' or '.join(FAMILIES)}, got {type(pipe).__name__}")


def pipeline_folder(pipe) -> Path | None:
    """The local folder `pipe` was loaded from (diffusers' ``name_or_path``), or None (a hub id, built in memory)."""
    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", None)
    path = Path(name) if name else None
    return path if path is not None and (path / "model_index.json").is_file() else None


def from_modules(pipe, *, unet: UNet2DConditionModel | str | Path | None = None, lora_forward=None,
                 lora_reverse=None, adapters=None, boundaries: Boundaries | None = None, fuse: bool = True
                 ) -> tuple[LatentDiffusion, LatentDiffusion | None, Path | None]:
    """(the model around `pipe`'s own UNet, the guidance-distilled model with iCD adapters or None, the folder
    `pipe` came from or None). See `icd.pipeline.Pipeline.from_diffusers` for the arguments."""
    family = pipeline_family(pipe)
    missing = [c for c in ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
               + (("tokenizer_2", "text_encoder_2") if family is sdxl else ()) if getattr(pipe, c, None) is None]
    if missing:
        raise ModelError(f"this {type(pipe).__name__} lacks {', '.join(missing)}")
    folder = pipeline_folder(pipe)
    try:
        schedule = NoiseSchedule.from_scheduler_config(dict(pipe.scheduler.config))
    except ValueError as e:
        raise ModelError(f"this pipeline's scheduler: {e}") from None
    own = pipe.unet
    dtype, device = own.dtype, own.device
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    common = dict(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=own,
                  schedule=schedule, name=str(folder) if folder else type(pipe).__name__,
                  image_size=int(own.config.sample_size) * vae_factor)
    if family is sdxl:
        base = sdxl.SDXLDiffusion(tokenizer_2=pipe.tokenizer_2, text_encoder_2=pipe.text_encoder_2,
                                  force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt",
                                                                                    True)),
                                  size_multiple=sdxl.SIZE_MULTIPLE, **common)
    else:
        vocabulary_file = folder / VOCABULARY_FILE if folder else None  # a closed-vocabulary (world) model
        vocabulary = json.loads(vocabulary_file.read_text()) if vocabulary_file and vocabulary_file.is_file() else None
        base = LatentDiffusion(vocabulary=vocabulary, size_multiple=None if vocabulary else sd15.SIZE_MULTIPLE,
                               **common)
    distilled = _distilled_unet(unet, own=own, folder=folder, dtype=dtype)
    if distilled is None:
        if any(v is not None for v in (lora_forward, lora_reverse, adapters)):
            raise ModelError("iCD adapters need the guidance-distilled UNet: pass unet= (a folder, hub id, state-dict "
                             f"file or UNet2DConditionModel){'' if folder is None else f' or add {GUIDANCE_UNET}/'}")
        return base, None, folder
    icd = base.with_unet(distilled.to(device))
    icd = attach_icd(icd, folder, adapters=adapters, lora_forward=lora_forward, lora_reverse=lora_reverse,
                     boundaries=boundaries, device=device, dtype=dtype, fuse=fuse, require_adapters=False)
    return base, icd, folder


def _distilled_unet(unet, *, own, folder: Path | None, dtype: torch.dtype) -> UNet2DConditionModel | None:
    """The guidance-distilled UNet: a module as given, a folder / hub id / state-dict file loaded, else the
    pipeline folder's ``unet_guidance`` where it has one, else None."""
    if isinstance(unet, torch.nn.Module):
        if unet.config.time_cond_proj_dim is None:
            raise ModelError("unet= is not a guidance-distilled UNet (no time_cond_proj_dim): iCD needs one")
        return unet.to(dtype)
    if unet is not None:
        return load_unet(unet, base_config=dict(own.config), dtype=dtype)
    if folder is not None and (folder / GUIDANCE_UNET).is_dir():
        return unet_folder(folder / GUIDANCE_UNET, dtype=dtype)
    return None
