"""The Stable Diffusion 1.5 family: loading a pipeline folder, its defaults, and its architecture as diffusers
configs with randomly initialised models of that shape.

SD 1.5 is the layout `LatentDiffusion` itself implements (one CLIP text encoder, 77 positions, the last hidden
state as conditioning); this module adds its native size (512², sides a multiple of 8), boundaries "4step-1" with
τ = 0.8 and the official guidance codes (docs/method.md §8.2, §8.4).

No weights: the values below are the published component configs of SD 1.5 (UNet 860 M parameters: four levels
320/640/1280/1280, two ResNet + transformer layers per level, cross-attention at the three upper levels, CLIP
ViT-L/14 text width 768; VAE 128/256/512/512, scaling factor 0.18215). The guidance-distilled variant adds a
256-d time-conditioning projection for e(w) (the LCM convention; docs/method.md §6). What these models are for:

- timing the SD-shaped path (`benchmarks/sd_shaped_timing.py`) where no weights can be downloaded;
- tests of code that must hold for SD's topology (four levels, attention at 64x64 / 32x32 / 16x16 / 8x8 tokens)
  at a reduced width (`scale=`), as diffusers tests itself.

The text side is a one-token-per-word tokenizer of the given vocabulary (the tests use the shapes world's) padded to
SD's 77 positions: the vocabulary differs from CLIP's 49 408
tokens, which changes nothing about the cost of a step. Real SD 1.5 weights load through
`icd.models.loading.load_models(<diffusers folder or hub id>)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from icd.boundaries import Boundaries
from icd.models import lora
from icd.models.base import ICDSpec, LatentDiffusion
from icd.models.tiny import scheduler_config
from icd.models.tokenizer import write_tokenizer
from icd.schedule import NoiseSchedule

PIPELINE_CLASS = "StableDiffusionPipeline"
NATIVE_SIZE = 512
SIZE_MULTIPLE = 8
BOUNDARIES = "4step-1"
TAU = 0.8
MAX_LENGTH = 77
GUIDANCE_DIM = 512  # time_cond_proj_dim of the released guidance-distilled UNet (docs/method.md §6)
GUIDANCE = {"edit": 19.0, "generate": 7.0}  # codes w = CFG - 1 of the distilled UNet: the official launch settings
BASE_GUIDANCE = 6.5  # CFG 7.5, the usual setting of the original UNet (DDIM / NPI / NTI)
DENOISER = "unet"  # the pipeline folder's network
GUIDANCE_SUBFOLDER = "unet_guidance"  # the guidance-distilled UNet (`icd train guidance`)
LORA_TARGETS = lora.LORA_TARGETS  # the modules the iCD adapters wrap


def load(path: Path, *, dtype: torch.dtype, unet: UNet2DConditionModel, vocabulary: Sequence[str] | None,
         schedule: NoiseSchedule, name: str) -> LatentDiffusion:
    """An SD-1.5-layout pipeline folder `path` around `unet` (safetensors only). A closed `vocabulary` marks a world
    model (the embedded one): its images are squares of its size; otherwise any size with sides a multiple of 8."""
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True)
    return LatentDiffusion(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, use_safetensors=True),
        vae=vae, unet=unet, schedule=schedule, name=name,
        image_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        vocabulary=vocabulary, size_multiple=None if vocabulary is not None else SIZE_MULTIPLE)


def unet_config(*, time_cond_proj_dim: int | None = None, width: int = 320, cross_attention_dim: int = 768,
                heads: int = 8, sample_size: int = 64) -> dict:
    """SD 1.5's UNet2DConditionModel config; `width` < 320 (with `cross_attention_dim`) gives a small same-topology
    model for tests."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=[width, 2 * width, 4 * width, 4 * width],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers' legacy name: the number of heads
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def vae_config(*, width: int = 128, sample_size: int = 512) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[width, 2 * width, 4 * width, 4 * width],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int, *, width: int = 768,
                        layers: int = 12) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 64),
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def _scaled(width: int, scale: int) -> int:
    """`width` / `scale` rounded down to a multiple of 32 (GroupNorm's 32 groups), at least 32."""
    return max(32, width // scale // 32 * 32)


def random_components(tokenizer_dir: str | Path, *, vocabulary: Sequence[str], device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, scale: int = 1, image_size: int = NATIVE_SIZE,
                      seed: int = 0) -> dict:
    """Randomly initialised SD-1.5-shaped components (keys of a `StableDiffusionPipeline`): the original UNet under
    ``unet`` and its guidance-distilled twin (the 512-d guidance embedding) under ``unet_guidance``.
    scale: divide every width by this (1 = SD 1.5's sizes; 10 gives a CPU-test model with the same topology)."""
    write_tokenizer(tokenizer_dir, vocabulary, max_length=MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    text_width = _scaled(768, scale)
    unet_kw = dict(width=_scaled(320, scale), cross_attention_dim=text_width,
                   heads=8 if scale == 1 else 2, sample_size=image_size // 8)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: an 860 M-parameter UNet is slow to build on a CPU
        parts = dict(
            tokenizer=tokenizer,
            text_encoder=CLIPTextModel(CLIPTextConfig(**text_encoder_config(
                len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, width=text_width,
                layers=12 if scale == 1 else 2))),
            vae=AutoencoderKL(**vae_config(width=_scaled(128, scale), sample_size=image_size)),
            unet=UNet2DConditionModel(**unet_config(**unet_kw)),
            unet_guidance=UNet2DConditionModel(**unet_config(time_cond_proj_dim=GUIDANCE_DIM, **unet_kw)),
        )
    return {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}


def random_models(tokenizer_dir: str | Path, *, vocabulary: Sequence[str], device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32,
                  scale: int = 1, image_size: int = 512, rank: int | None = 64, seed: int = 0
                  ) -> tuple[LatentDiffusion, LatentDiffusion]:
    """(base, icd): a randomly initialised SD-1.5-shaped model and its guidance-distilled twin.

    Both share tokenizer, text encoder, VAE and NFE counter. `icd` has a UNet with the guidance embedding and, unless
    rank is None, the two iCD LoRA adapters (peft's initialisation: zero deltas) fused for inference, boundaries
    4step-1 and tau 0.8 -- the layout `icd.models.loading.load_models` returns, so `Pipeline(icd, base)` edits.
    Images are any size with sides a multiple of 8, as SD 1.5 takes them.
    """
    parts = random_components(tokenizer_dir, vocabulary=vocabulary, device=device, dtype=dtype, scale=scale,
                              image_size=image_size, seed=seed)
    schedule = NoiseSchedule.from_scheduler_config(scheduler_config())
    base = LatentDiffusion(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                           unet=parts["unet"], schedule=schedule,
                           name=f"sd15-shaped-random{'' if scale == 1 else f'/{scale}'}", image_size=image_size,
                           size_multiple=SIZE_MULTIPLE)
    icd = base.with_unet(parts["unet_guidance"])
    if rank is not None:
        lora.add_adapters(icd.unet, rank=rank, alpha=rank, seed=seed)
        icd.unet.to(device=device, dtype=dtype).requires_grad_(False)
        icd.icd = ICDSpec(path=Path(tokenizer_dir), boundaries=Boundaries.preset(BOUNDARIES), tau=TAU,
                          w_set=(0.0, 1.0, 2.0, 3.0))
        icd.fused = lora.FusedAdapters(icd.unet)
    return base, icd
