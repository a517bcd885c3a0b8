"""The FLUX family: a `FluxPipeline` folder (FLUX.1-dev / -schnell layout, or the embedded flow model of the shapes
world, `icd.models.flux_embedded`) behind the one convention (docs/flow.md §2, §4).

What differs from the UNet families, and lives only here:
- **Text.** ``text_encoder`` (CLIP) gives only its pooled output [B, D_pool]; ``text_encoder_2`` (T5) gives the token
  sequence [B, L, D] of the joint attention, padded to the folder's T5 length (``text_length.json`` of the embedded
  model, else 512 as `FluxPipeline`'s default). The empty prompt is the unconditional input of two-pass guidance
  (`FluxPipeline`'s ``true_cfg_scale``).
- **Latents.** The methods see the VAE's latents [B, C, h, w]; the transformer reads 2x2 patches packed into tokens
  (`icd.models.flux_embedded.pack`) with RoPE position ids (0, row, column) and zero text ids.
- **Time.** The transformer reads the noise level s_t of `icd.schedule.DiscreteFlowSchedule` with FLUX's dynamic
  shift e^mu for the native size's image-token count (`icd.schedule.flux_mu`).
- **Guidance.** FLUX.1-dev embeds a guidance scale (``guidance_embeds``): code w is scale 1 + w, one call; a
  transformer without it (schnell, the embedded teacher) takes two-pass CFG.
- **Size.** The native size is the VAE's ``sample_size`` (64 for the embedded model, whose images are 64² squares;
  1024 for FLUX.1, any size with sides a multiple of 16).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from icd.models import flux_embedded as fe
from icd.models.base import Cond
from icd.models.flow import FlowDiffusion
from icd.models.tiny import VOCABULARY_FILE
from icd.schedule import DiscreteFlowSchedule, flux_mu

PIPELINE_CLASS = "FluxPipeline"
KIND = "flow"  # a rectified-flow family (`LatentDiffusion.kind`)
COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "transformer", "scheduler")
NATIVE_SIZE = 1024
SIZE_MULTIPLE = 16  # VAE factor 8 x patch 2
T5_LENGTH = 512  # FluxPipeline's default max_sequence_length
GUIDANCE = {"edit": 0.0, "generate": 0.0}  # codes w of a two-pass teacher on the world (CFG 1: none); docs/flow.md §3
BASE_GUIDANCE = 2.5  # FLUX.1-dev's usual embedded scale 3.5 (code w = 2.5)
TAU = None
BOUNDARIES = "4step-1"
DENOISER = "transformer"  # the pipeline folder's network
GUIDANCE_SUBFOLDER = "transformer_guidance"  # the guidance-distilled transformer (`icd train guidance`)
# The modules the iCD adapters wrap (docs/flow.md §8): every attention and MLP projection of the double-stream blocks
# (image and text streams), of the single-stream blocks (fused attention + MLP in, proj_out), the adaLN modulation
# projections that carry the time and guidance (the UNet adapters' time_emb_proj), and the output projection.
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear",
    "norm1_context.linear", "norm.linear", "norm_out.linear",
)


class FluxDiffusion(FlowDiffusion):
    """FLUX: `encode_prompt` gives T5 tokens [B, L, D] and the CLIP pooled embedding [B, D_pool]."""

    family = "flux"

    def __init__(self, *, tokenizer_2, text_encoder_2, max_sequence_length: int = T5_LENGTH, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """CLIP's pooled output and T5's last hidden states, as `FluxPipeline.encode_prompt` computes them."""
        self.check_prompts(prompts)
        clip_ids = self.token_ids(self.tokenizer, prompts)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5 = self.tokenizer_2(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)
        tokens = self.text_encoder_2(t5, output_hidden_states=False)[0]
        return Cond(tokens=tokens.to(self.dtype), pooled=pooled.to(self.dtype))

    @property
    def attention_tokenizer(self):
        """T5's: the joint attention reads T5's tokens (CLIP gives only the pooled vector)."""
        return self.tokenizer_2

    def _ids(self, h: int, w: int, n_text: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(text ids [L, 3] zeros, image ids [h/2 * w/2, 3]) on `device`, built once per shape."""
        key = ("ids", h, w, n_text, device, self.dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            txt = torch.zeros(n_text, 3, dtype=self.dtype, device=device)
            cached = self._cache(key, (txt, fe.image_ids(h, w).to(device, self.dtype)))
        return cached

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: Cond, *, guidance: torch.Tensor | None
                 ) -> torch.Tensor:
        h, w = x.shape[-2:]
        txt_ids, img_ids = self._ids(h, w, cond.tokens.shape[1], x.device)
        out = self.unet(hidden_states=fe.pack(x), timestep=s.to(self.dtype),
                        guidance=None if guidance is None else guidance.to(self.dtype),
                        pooled_projections=cond.pooled.to(x.device, self.dtype),
                        encoder_hidden_states=cond.tokens.to(x.device, self.dtype), txt_ids=txt_ids,
                        img_ids=img_ids, return_dict=False)[0]
        return fe.unpack(out, h, w)


def schedule_for(image_size: int, vae_factor: int = 8, scheduler_config: dict | None = None
                 ) -> DiscreteFlowSchedule:
    """The flow schedule of the folder's scheduler config: FLUX.1-dev's dynamic shift e^mu for `image_size`² images
    ((size / (2 vae_factor))² packed tokens: 4096 for FLUX.1 at 1024², 64 for the embedded model at 64² with its 4x
    VAE; mu on the config's line), or the static ``shift`` of a config without dynamic shifting (FLUX.1-schnell:
    shift 1, so its 4 steps are s = 1, .75, .5, .25). No config: dynamic, at diffusers' defaults."""
    config = scheduler_config or {}
    if not config.get("use_dynamic_shifting", True):
        return DiscreteFlowSchedule.shifted(float(config.get("shift", 1.0)))
    tokens = (image_size // (vae_factor * fe.PATCH)) ** 2
    line = {k: config[k] for k in ("base_shift", "max_shift") if k in config}
    for ours, theirs in (("base_seq_len", "base_image_seq_len"), ("max_seq_len", "max_image_seq_len")):
        if theirs in config:
            line[ours] = int(config[theirs])
    return DiscreteFlowSchedule.shifted(math.exp(flux_mu(tokens, **line)))


def denoiser(path: Path, *, dtype: torch.dtype, subfolder: str = DENOISER) -> FluxTransformer2DModel:
    """The transformer in ``<path>/<subfolder>`` (the folder's own, or its guidance-distilled one), safetensors only."""
    return FluxTransformer2DModel.from_pretrained(path / subfolder, torch_dtype=dtype, use_safetensors=True)


def load(path: Path, *, dtype: torch.dtype, name: str, transformer=None, subfolder: str = DENOISER) -> FluxDiffusion:
    """The `FluxPipeline` folder `path` (diffusers layout), safetensors only; `transformer`: another network in place
    of ``<path>/<subfolder>`` (default the folder's own ``transformer``)."""
    if transformer is None:
        transformer = denoiser(path, dtype=dtype, subfolder=subfolder)
    vae = fe.flow_vae(AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True))
    vocabulary_file = path / VOCABULARY_FILE  # a closed-vocabulary model (the embedded one)
    vocabulary = json.loads(vocabulary_file.read_text()) if vocabulary_file.is_file() else None
    length_file = path / fe.TEXT_LENGTH_FILE
    length = json.loads(length_file.read_text())["max_sequence_length"] if length_file.is_file() else T5_LENGTH
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
    image_size = int(vae.config.sample_size)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return FluxDiffusion(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(path / "tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, use_safetensors=True),
        text_encoder_2=T5EncoderModel.from_pretrained(path / "text_encoder_2", torch_dtype=dtype,
                                                      use_safetensors=True),
        vae=vae, unet=transformer, schedule=schedule_for(image_size, vae_factor, scheduler), name=name,
        image_size=image_size,
        vocabulary=vocabulary, size_multiple=None if vocabulary is not None else SIZE_MULTIPLE,
        max_sequence_length=length)
