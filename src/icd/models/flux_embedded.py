"""The embedded flow-matching text-to-image model, shaped exactly like FLUX.1 (docs/flow.md §2).

Components (diffusers format, so `FluxPipeline.from_pretrained(<dir>)` loads it offline):

==============  =====================================================================================
tokenizer       `CLIPTokenizer` of the SD-shaped embedded model (one token per world word), 20 positions
text_encoder    `CLIPTextModel`, hidden 64, 2 layers, 4 heads: FLUX reads only its pooled output
tokenizer_2     `T5TokenizerFast` over a word-level vocabulary (one token per world word, then ``</s>``)
text_encoder_2  `T5EncoderModel`, d_model 64, 2 layers, 4 heads: the token sequence of the joint attention
vae             the SD-shaped model's `AutoencoderKL` (64x64x3 <-> 16x16x4), with ``shift_factor = 0``; or one of
                2 levels (64x64x3 <-> 32x32x4, `tiny.vae_config(2)`) for a 16x16 token grid
transformer     `FluxTransformer2DModel`: 2x2-packed latents (16 channels, 8x8 = 64 image tokens), double-stream
                (MM-DiT) blocks then single-stream blocks, head dim 32, RoPE axes (8, 12, 12), no guidance embedding
scheduler       `FlowMatchEulerDiscreteScheduler` with FLUX's dynamic (resolution-dependent) shift
==============  =====================================================================================

Text length: the model is trained with T5 sequences padded to `TEXT_LENGTH` tokens; pass
``max_sequence_length=TEXT_LENGTH`` to `FluxPipeline` (its default, 512, pads far past what the model saw).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from icd.models import tiny

TEXT_LENGTH = 20  # T5 tokens per caption (padded): a 3-object caption is 18 words + </s>
T5_DIM = 64
PATCH = 2  # FluxPipeline packs 2x2 latent patches into one token
PACKED_CHANNELS = tiny.LATENT_CHANNELS * PATCH * PATCH  # 16
IMAGE_TOKENS = (tiny.LATENT_SIZE // PATCH) ** 2  # 64 over the SD-shaped model's VAE
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
TEXT_LENGTH_FILE = "text_length.json"  # the T5 length the transformer was trained with


@dataclass(frozen=True)
class FluxSize:
    """The transformer's size knobs (everything else is fixed by the world and FLUX's layout)."""

    num_layers: int = 2  # double-stream blocks
    num_single_layers: int = 4  # single-stream blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # sums to attention_head_dim, each even
    guidance_embeds: bool = False

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must be even and sum to attention_head_dim "
                             f"{self.attention_head_dim}")


def transformer_config(size: FluxSize = FluxSize()) -> dict:
    return dict(
        patch_size=1,  # packing is done by the pipeline
        in_channels=PACKED_CHANNELS,
        out_channels=None,
        num_layers=size.num_layers,
        num_single_layers=size.num_single_layers,
        attention_head_dim=size.attention_head_dim,
        num_attention_heads=size.num_attention_heads,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=tiny.TEXT_DIM,
        guidance_embeds=size.guidance_embeds,
        axes_dims_rope=tuple(size.axes_dims_rope),
    )


def scheduler_config() -> dict:
    """FLUX.1's scheduler settings: the dynamic shift e^mu, mu = `icd.schedule.flux_mu` (64 tokens: e^mu = 1.53)."""
    return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")


def build_transformer(size: FluxSize = FluxSize()) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(**transformer_config(size))


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**scheduler_config())


def t5_config(vocab_size: int, pad_id: int, eos_id: int) -> dict:
    return dict(vocab_size=vocab_size, d_model=T5_DIM, d_kv=T5_DIM // 4, d_ff=4 * T5_DIM, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", pad_token_id=pad_id, eos_token_id=eos_id,
                decoder_start_token_id=pad_id, is_encoder_decoder=False, use_cache=False)


def build_t5_tokenizer(directory: str | Path, vocabulary: Sequence[str]) -> T5TokenizerFast:
    """A `T5TokenizerFast` whose Unigram vocabulary is ``<pad>, </s>, <unk>`` and one piece ``"\u2581word"`` per
    world word, saved to `directory` and loaded back (T5's SentencePiece layout, built offline).

    Every world word is exactly one token and ``</s>`` is appended (docs/flow.md §2). The vocabulary is
    case-sensitive and any other word maps to ``<unk>``; prompts are validated against the world vocabulary (lower
    case) before they reach a tokenizer.
    """
    scores = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), *(("\u2581" + w, -1.0) for w in dict.fromkeys(vocabulary))]
    directory = Path(directory)
    T5TokenizerFast(vocab=scores, pad_token=T5_PAD, eos_token=T5_EOS, unk_token=T5_UNK, extra_ids=0,
                    model_max_length=TEXT_LENGTH).save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))


def build_t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**t5_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)))


@dataclass
class FluxParts:
    """The trainable parts and their tokenizers (the VAE and scheduler are fixed)."""

    tokenizer: CLIPTokenizer
    text_encoder: torch.nn.Module
    tokenizer_2: T5TokenizerFast
    text_encoder_2: T5EncoderModel
    transformer: FluxTransformer2DModel


def build_parts(directory: str | Path, vocabulary: Sequence[str], size: FluxSize = FluxSize()) -> FluxParts:
    """Fresh (randomly initialised) parts; the tokenizers are written under `directory`/{tokenizer,tokenizer_2}."""
    directory = Path(directory)
    clip_tok = tiny.build_tokenizer(directory / "tokenizer", vocabulary)
    t5_tok = build_t5_tokenizer(directory / "tokenizer_2", vocabulary)
    return FluxParts(clip_tok, tiny.build_text_encoder(clip_tok), t5_tok, build_t5(t5_tok), build_transformer(size))


def flow_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The embedded VAE with ``shift_factor = 0`` (FluxPipeline decodes z / scaling_factor + shift_factor and fails
    on None); the latents are the same."""
    vae.register_to_config(shift_factor=0.0)
    return vae


# ----------------------------------------------------------------------------------------------- transformer inputs
def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, 16, 16) -> (B, 64, 16): FluxPipeline's 2x2 packing (each token one patch, channel-major)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int = tiny.LATENT_SIZE, width: int = tiny.LATENT_SIZE) -> torch.Tensor:
    """Inverse of `pack`: (B, L, 4C) -> (B, C, H, W) for H x W latents."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.view(b, height // PATCH, width // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int = tiny.LATENT_SIZE, width: int = tiny.LATENT_SIZE) -> torch.Tensor:
    """(L, 3) RoPE ids of the packed grid: (0, row, column), as FluxPipeline._prepare_latent_image_ids."""
    h, w = height // PATCH, width // PATCH
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def encode_text(parts: FluxParts, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled CLIP [B, 64], T5 tokens [B, L, 64]) as FluxPipeline.encode_prompt computes them."""
    pooled = parts.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    tokens = parts.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return pooled, tokens


def velocity(transformer: FluxTransformer2DModel, x_packed: torch.Tensor, s: torch.Tensor, *, pooled: torch.Tensor,
             tokens: torch.Tensor, guidance: torch.Tensor | None = None,
             latent_size: int = tiny.LATENT_SIZE) -> torch.Tensor:
    """v_theta(x_s, s, c) on packed `latent_size`² latents; `s` is the noise level in [0, 1] per sample (the
    pipeline passes timestep / 1000 = s; the model multiplies by 1000)."""
    txt_ids = torch.zeros(tokens.shape[1], 3, dtype=x_packed.dtype, device=x_packed.device)
    return transformer(hidden_states=x_packed, timestep=s.to(x_packed.dtype), guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=tokens, txt_ids=txt_ids,
                       img_ids=image_ids(latent_size, latent_size).to(x_packed), return_dict=False)[0]


# ------------------------------------------------------------------------------------------------------- the folder
def save_pipeline(directory: str | Path, *, parts: FluxParts, vae: AutoencoderKL, vocabulary: Sequence[str]) -> Path:
    """Save a diffusers `FluxPipeline` folder plus the closed vocabulary and the trained T5 length."""
    from diffusers import FluxPipeline  # its import pulls in transformers' image processors (slow, noisy)

    pipe = FluxPipeline(scheduler=build_scheduler(), vae=flow_vae(vae), text_encoder=parts.text_encoder,
                        tokenizer=parts.tokenizer, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                        transformer=parts.transformer)
    directory = Path(directory)
    pipe.save_pretrained(directory)
    tiny.write_tokenizer_files(directory / "tokenizer", vocabulary)
    (directory / tiny.VOCABULARY_FILE).write_text(json.dumps(list(vocabulary)) + "\n")
    (directory / TEXT_LENGTH_FILE).write_text(json.dumps({"max_sequence_length": TEXT_LENGTH}) + "\n")
    return directory


def build_random_pipeline(directory: str | Path, *, vocabulary: Sequence[str], size: FluxSize = FluxSize(),
                          seed: int = 0, vae_levels: int = len(tiny.VAE_CHANNELS)) -> Path:
    """A randomly initialised embedded-flow pipeline folder (for tests; no training, no download); `vae_levels` 2
    gives 32x32 latents, a 16x16 token grid."""
    directory = Path(directory)
    torch.manual_seed(seed)
    parts = build_parts(directory / "_tokenizers", vocabulary, size)
    out = save_pipeline(directory, parts=parts, vae=tiny.build_vae(vae_levels), vocabulary=vocabulary)
    shutil.rmtree(directory / "_tokenizers")
    return out
