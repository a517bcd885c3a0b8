"""The embedded tiny text-to-image model, shaped exactly like Stable Diffusion.

Components (diffusers format, so `StableDiffusionPipeline.from_pretrained(<dir>)` loads it):

==============  =====================================================================================
tokenizer       `CLIPTokenizer` built from a closed vocabulary (one token per word; the shapes world's), 20 positions
text_encoder    `CLIPTextModel`, hidden 64, 2 layers, 4 heads
vae             `AutoencoderKL`, 64x64x3 <-> 16x16x4 (two downsamplings), scaling factor measured from data
unet            `UNet2DConditionModel` on 16x16x4 latents, channels 64/128/128, cross-attention at 8x8 and
                4x4 tokens (and the 4x4 mid block); the 16x16 level has no attention to keep CPU training cheap
scheduler       `DDIMScheduler`, SD's scaled_linear betas 0.00085-0.012, 1000 steps, epsilon prediction
==============  =====================================================================================
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from icd.models.tokenizer import write_tokenizer

MAX_LENGTH = 20  # BOS + "a large red circle and ... on a gray background" (3 objects) + EOS
TEXT_DIM = 64
LATENT_CHANNELS = 4
IMAGE_SIZE = 64  # the shapes world's resolution
LATENT_SIZE = IMAGE_SIZE // 4


def text_encoder_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


VAE_CHANNELS = (32, 64, 64)  # one entry per resolution level; each level after the first halves the image


def vae_config(levels: int = len(VAE_CHANNELS)) -> dict:
    """The embedded `AutoencoderKL`: 3 levels give 64x64x3 <-> 16x16x4 (the SD-shaped model's); 2 levels give
    32x32x4 latents (4x the positions, for a transformer over 2x2-packed latents that needs a finer token grid)."""
    if not 1 <= levels <= len(VAE_CHANNELS):
        raise ValueError(f"levels must lie in [1, {len(VAE_CHANNELS)}], got {levels}")
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=list(VAE_CHANNELS[:levels]),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by the measured value after VAE training
    )


def unet_config(*, time_cond_proj_dim: int | None = None) -> dict:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=[64, 128, 128],
        layers_per_block=1,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def scheduler_config() -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def write_tokenizer_files(directory: str | Path, vocabulary: Sequence[str]) -> None:
    """vocab.json + merges.txt (+ configs) of the one-token-per-word tokenizer, beside any tokenizer.json
    transformers wrote."""
    write_tokenizer(directory, vocabulary, max_length=MAX_LENGTH)


def build_tokenizer(directory: str | Path, vocabulary: Sequence[str]):
    """Write the tokenizer of `vocabulary` to `directory` and load it as a `CLIPTokenizer`."""
    write_tokenizer_files(directory, vocabulary)
    return CLIPTokenizer.from_pretrained(str(directory))


def build_text_encoder(tokenizer):
    cfg = CLIPTextConfig(**text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id))
    return CLIPTextModel(cfg)


def build_vae(levels: int = len(VAE_CHANNELS)):
    return AutoencoderKL(**vae_config(levels))


def build_unet(*, time_cond_proj_dim: int | None = None):
    return UNet2DConditionModel(**unet_config(time_cond_proj_dim=time_cond_proj_dim))


def build_scheduler():
    return DDIMScheduler(**scheduler_config())


VOCABULARY_FILE = "world_vocabulary.json"  # marks a closed-vocabulary (world) model; prompts are checked against it


def save_pipeline(directory: str | Path, *, tokenizer, text_encoder, vae, unet, vocabulary: Sequence[str]) -> Path:
    """Save a diffusers `StableDiffusionPipeline` folder (safety checker off) plus its closed vocabulary."""
    from diffusers import StableDiffusionPipeline  # its import pulls in transformers' image processors (slow, noisy)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    directory = Path(directory)
    pipe.save_pretrained(directory)
    write_tokenizer_files(directory / "tokenizer", vocabulary)
    (directory / VOCABULARY_FILE).write_text(json.dumps(list(vocabulary)) + "\n")
    return directory


def build_random_pipeline(directory: str | Path, *, vocabulary: Sequence[str], seed: int = 0) -> Path:
    """A randomly initialised embedded-architecture pipeline folder (for tests; no training, no download)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(directory / "_tokenizer", vocabulary)
    torch.manual_seed(seed)
    out = save_pipeline(directory, tokenizer=tokenizer, text_encoder=build_text_encoder(tokenizer), vae=build_vae(),
                        unet=build_unet(), vocabulary=vocabulary)
    shutil.rmtree(directory / "_tokenizer")
    return out
