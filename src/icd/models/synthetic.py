"""Randomly initialised Stable Diffusion pipelines on disk, in the layouts real users download (no weights fetched).

`write_pipeline(directory, family)` writes what a user of the released iCD weights has:

- ``pipeline/``: a diffusers `StableDiffusionPipeline` / `StableDiffusionXLPipeline` folder (original UNet);
- ``unet-distilled/``: a guidance-distilled UNet folder (``config.json`` with ``time_cond_proj_dim`` 512 and
  ``diffusion_pytorch_model.safetensors``), the layout of ``sd15-cfg-distill-unet`` / ``sdxl-cfg-distill-unet``;
- ``lora/``: the two iCD LoRA files in the released format and names (`icd.models.released`), with small random
  non-zero deltas so that they change the output.

The tests build tiny same-topology models this way, as diffusers tests itself; `benchmarks/sd_shaped_timing.py` builds
full-size ones for timing. With ``own_format`` the distilled UNet and our adapter folder also go inside the pipeline
folder (``unet_guidance/``, ``icd/``), the layout `icd bench` and `icd train` read.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from icd.boundaries import Boundaries
from icd.models import lora, sd15, sdxl
from icd.models.loading import ADAPTERS_SUBFOLDER, GUIDANCE_UNET
from icd.models.released import RELEASED_ALPHA, save_released
from icd.models.tiny import scheduler_config


@dataclass(frozen=True)
class PipelineFiles:
    pipeline: Path
    unet: Path
    lora_forward: Path
    lora_reverse: Path


def _randomise_lora(unet, *, seed: int, scale: float) -> None:
    """Small random B matrices (peft starts them at zero), so an adapter changes the UNet's output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def write_pipeline(directory: str | Path, family: str = "sd15", *, vocabulary: Sequence[str], tiny: bool = True,
                   image_size: int | None = None, rank: int = 4, seed: int = 0, lora_scale: float = 0.05,
                   own_format: bool = False) -> PipelineFiles:
    """Write a random `family` ("sd15" / "sdxl") pipeline, distilled UNet and released-format LoRA files (see the
    module docstring). tiny: the families' topology at width 32 (CPU tests); image_size: the native size (default
    64 when tiny, else the family's)."""
    directory = Path(directory)
    module = sdxl if family == "sdxl" else sd15
    size = image_size or (64 if tiny else module.NATIVE_SIZE)
    if family == "sdxl":
        parts = sdxl.random_components(directory / "tokenizer", vocabulary=vocabulary, tiny=tiny, image_size=size,
                                       seed=seed)
        pipe_cls = StableDiffusionXLPipeline
    elif family == "sd15":
        parts = sd15.random_components(directory / "tokenizer", vocabulary=vocabulary, scale=10 if tiny else 1,
                                       image_size=size, seed=seed)
        pipe_cls = StableDiffusionPipeline
    else:
        raise ValueError(f"unknown family {family!r}; choose from sd15, sdxl")
    distilled = parts.pop("unet_guidance")
    extra = {} if family == "sdxl" else {"safety_checker": None, "feature_extractor": None,
                                          "requires_safety_checker": False}
    pipe = pipe_cls(scheduler=DDIMScheduler(**scheduler_config()), **parts, **extra)
    files = PipelineFiles(pipeline=directory / "pipeline", unet=directory / "unet-distilled",
                          lora_forward=directory / "lora", lora_reverse=directory / "lora")
    pipe.save_pretrained(files.pipeline, safe_serialization=True)
    distilled.save_pretrained(files.unet, safe_serialization=True)
    if own_format:
        shutil.copytree(files.unet, files.pipeline / GUIDANCE_UNET)
    boundaries = Boundaries.preset(module.BOUNDARIES)
    lora.add_adapters(distilled, rank=rank, alpha=RELEASED_ALPHA, seed=seed)
    _randomise_lora(distilled, seed=seed, scale=lora_scale)
    written = save_released(distilled, directory / "lora", boundaries)
    if own_format:  # the same adapters in our format
        lora.save_adapters(distilled, files.pipeline / ADAPTERS_SUBFOLDER,
                           {"rank": rank, "alpha": RELEASED_ALPHA, "boundaries": boundaries.to_dict(),
                            "tau": module.TAU, "w_set": [0.0]})
    return PipelineFiles(pipeline=files.pipeline, unet=files.unet, lora_forward=written[lora.FORWARD],
                         lora_reverse=written[lora.REVERSE])
