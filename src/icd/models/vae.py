"""A user-given VAE in place of a pipeline's own: ``Pipeline.from_pretrained(..., vae=DIR)`` / ``--vae DIR``.

SDXL's own VAE overflows in fp16, so its config says ``force_upcast`` and a half-precision model runs it with an
overflow check (`icd.models.base.LatentDiffusion.vae_call`: a batch whose output holds NaN / Inf is computed again in
fp32). An fp16-safe VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``: the same latents, weights rescaled so that no
activation leaves fp16's range; its config says ``force_upcast: false``) runs in fp16 with no check. The VAE's own
config decides: ``force_upcast`` true keeps the check, false drops it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from icd.models.base import LatentDiffusion
from icd.models.loading import ModelError, resolve_hub

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_vae(spec: str | Path, *, dtype: torch.dtype, device: torch.device | str) -> AutoencoderKL:
    """An `AutoencoderKL` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or hub id, in `dtype` on
    `device`; ModelError in one line otherwise."""
    path = Path(spec)
    if not path.exists() and _HUB_ID.match(str(spec)):
        path = resolve_hub(str(spec), what="VAE")
    if not path.exists():
        raise ModelError(f"--vae {spec}: not found (a VAE folder or hub id)")
    if not (path / "config.json").is_file():
        raise ModelError(f"--vae {spec}: not a diffusers VAE folder (no config.json)")
    try:  # safetensors only, as every other component
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"--vae {spec}: cannot load it ({first[0] if first else type(e).__name__})") from None
    return vae.to(device).eval().requires_grad_(False)


def use_vae(model: LatentDiffusion, vae: AutoencoderKL) -> None:
    """`vae` as `model`'s VAE (same latent channels and scaling factor expected: ValueError otherwise); the overflow
    check follows its config's ``force_upcast`` (see the module docstring)."""
    old = model.vae
    if vae.config.latent_channels != old.config.latent_channels or abs(
            float(vae.config.scaling_factor) - float(old.config.scaling_factor)) > 1e-6:
        raise ModelError(f"--vae: its latents ({vae.config.latent_channels} channels, scaling "
                         f"{vae.config.scaling_factor}) differ from the model's ({old.config.latent_channels}, "
                         f"{old.config.scaling_factor})")
    model.vae = vae.eval().requires_grad_(False)
    model.vae_upcast = bool(getattr(vae.config, "force_upcast", False))
