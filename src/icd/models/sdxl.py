"""The Stable Diffusion XL family: two text encoders, pooled embeddings and size ids, behind the one convention.

What differs from SD 1.5 (docs/stable-diffusion.md; docs/method.md §8.3), and lives only here:

- **Text.** Two CLIP text encoders read the prompt: ``text_encoder`` (CLIP ViT-L, 768) and ``text_encoder_2``
  (OpenCLIP bigG with a projection, 1280). The token embeddings are the two penultimate hidden states concatenated
  (2048 wide); the pooled embedding is ``text_encoder_2``'s projected output. The empty prompt is all zeros where the
  pipeline's config says ``force_zeros_for_empty_prompt`` (SDXL base does).
- **Size ids.** The UNet also reads ``time_ids`` = (original size, crop top-left, target size). They follow the
  latents being denoised: (H, W, 0, 0, H, W) in pixels for a latent of H / 8 x W / 8, so any photo size conditions
  as a full, uncropped image.
- **Native size** 1024² with sides a multiple of 64; boundaries "4step-2" with τ = 0.7; VAE scaling 0.13025. SDXL's
  VAE overflows in fp16 (its config says ``force_upcast``): it runs in the model's dtype and a batch whose output
  holds NaN / Inf is computed again in fp32 (`LatentDiffusion.vae_call`); an fp16-safe VAE given by the user
  (`icd.models.vae`, ``--vae``) runs in fp16 with no check.

`SDXLDiffusion` is a `LatentDiffusion`: editing, inversion, the baselines, attention control and the bench see no
difference. `unet_config` / `random_models` give SDXL's published architecture (or a same-topology reduced width) with
random weights for tests and timing; no weights are downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from icd.models import lora
from icd.models.base import Cond, LatentDiffusion
from icd.models.tokenizer import write_tokenizer
from icd.schedule import NoiseSchedule

PIPELINE_CLASS = "StableDiffusionXLPipeline"
NATIVE_SIZE = 1024
SIZE_MULTIPLE = 64
BOUNDARIES = "4step-2"
TAU = 0.7
MAX_LENGTH = 77
GUIDANCE_DIM = 512  # time_cond_proj_dim of the released guidance-distilled UNet (docs/method.md §6)
GUIDANCE = {"edit": 7.0, "generate": 7.0}  # codes w = CFG - 1 of the distilled UNet (docs/method.md §8.3, §8.4)
BASE_GUIDANCE = 6.5  # CFG 7.5, the usual setting of the original UNet (DDIM / NPI / NTI)
DENOISER = "unet"  # the pipeline folder's network
GUIDANCE_SUBFOLDER = "unet_guidance"  # the guidance-distilled UNet (`icd train guidance`)
LORA_TARGETS = lora.LORA_TARGETS  # the modules the iCD adapters wrap


class SDXLDiffusion(LatentDiffusion):
    """SDXL: `encode_prompt` gives tokens [B, 77, 2048] and pooled [B, 1280]; the UNet reads ``added_cond_kwargs``."""

    family = "sdxl"

    def __init__(self, *, tokenizer_2, text_encoder_2, force_zeros_for_empty_prompt: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.force_zeros = force_zeros_for_empty_prompt

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """Both encoders' penultimate hidden states, concatenated; the second encoder's projected pooled output."""
        self.check_prompts(prompts)
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self.token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        return Cond(tokens=torch.cat(hidden, dim=-1).to(self.dtype), pooled=out.text_embeds.to(self.dtype))

    def empty_cond(self, n: int) -> Cond:
        """The unconditional rows: zeros where the pipeline forces them (SDXL base), else the empty prompt."""
        key = (n, str(self.device))
        if key not in self._empty:
            cond = self.encode_prompt([""] * n)
            if self.force_zeros:
                cond = Cond(tokens=torch.zeros_like(cond.tokens), pooled=torch.zeros_like(cond.pooled))
            self._empty[key] = cond
        return self._empty[key]

    def unet_kwargs(self, cond: Cond, x_t: torch.Tensor) -> dict:
        """``added_cond_kwargs``: the pooled embedding and the size ids (H, W, 0, 0, H, W) of these latents."""
        if cond.pooled is None:
            raise ValueError("SDXL conditioning needs pooled embeddings (encode with SDXLDiffusion.encode_prompt)")
        time_ids = cond.extra.get("time_ids")
        if time_ids is None:  # built once per (size, batch, device): no host-to-device copy per call
            h, w = (int(v) * self.vae_factor for v in x_t.shape[-2:])
            key = ("time_ids", h, w, x_t.shape[0], x_t.device, self.dtype)
            time_ids = self._device_cache.get(key)
            if time_ids is None:
                time_ids = self._cache(key, torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(
                    x_t.shape[0], 6).to(x_t.device, self.dtype))
        return {"added_cond_kwargs": {"text_embeds": cond.pooled.to(x_t.device, self.dtype),
                                      "time_ids": time_ids.to(x_t.device, self.dtype)}}


def load(path: Path, *, dtype: torch.dtype, unet: UNet2DConditionModel, index: dict, schedule: NoiseSchedule,
         name: str) -> SDXLDiffusion:
    """The SDXL pipeline folder `path` (diffusers layout) around `unet`, safetensors only."""
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True)
    model = SDXLDiffusion(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, use_safetensors=True),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", torch_dtype=dtype,
                                                                   use_safetensors=True),
        vae=vae, unet=unet, schedule=schedule, name=name,
        image_size=int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1),
        size_multiple=SIZE_MULTIPLE, force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    # SDXL's VAE overflows in fp16: run it in `dtype`, an overflowing batch again in fp32 (diffusers upcasts it whole)
    model.vae_upcast = bool(getattr(vae.config, "force_upcast", False))
    return model


# ---------------------------------------------------------------------------------------------- random models
def unet_config(*, time_cond_proj_dim: int | None = None, tiny: bool = False, sample_size: int = 128) -> dict:
    """SDXL base's UNet2DConditionModel config (2.6 B parameters; 10 transformer layers at the 32x32 level), or with
    `tiny` the same three-level topology at width 32 (CPU tests)."""
    widths, layers, heads = ([32, 64, 64], [1, 1, 1], [2, 2, 2]) if tiny else ([320, 640, 1280], [1, 2, 10],
                                                                               [5, 10, 20])
    text, time_dim = (64, 8) if tiny else (2048, 256)
    pooled = 32 if tiny else 1280
    return dict(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=widths, layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=layers, attention_head_dim=heads, cross_attention_dim=text,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled, norm_num_groups=32,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def vae_config(*, tiny: bool = False, sample_size: int = 1024) -> dict:
    widths = [32, 32, 32, 32] if tiny else [128, 256, 512, 512]
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=widths, layers_per_block=1 if tiny else 2,
                latent_channels=4, norm_num_groups=32, sample_size=sample_size, scaling_factor=0.13025,
                force_upcast=True)


def text_encoder_configs(vocab_size: int, bos: int, eos: int, *, tiny: bool = False) -> tuple[dict, dict]:
    """(CLIP ViT-L, OpenCLIP bigG) text configs; `tiny`: 32 wide, 2 layers each."""
    common = dict(vocab_size=vocab_size, max_position_embeddings=MAX_LENGTH, bos_token_id=bos, eos_token_id=eos,
                  pad_token_id=eos)
    if tiny:
        small = dict(hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
                     num_attention_heads=2, **common)
        return dict(small, hidden_act="quick_gelu"), dict(small, hidden_act="gelu")
    return (dict(hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
                 num_attention_heads=12, hidden_act="quick_gelu", **common),
            dict(hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", **common))


def random_components(tokenizer_dir: str | Path, *, vocabulary: Sequence[str], tiny: bool = False,
                      image_size: int = NATIVE_SIZE, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Randomly initialised SDXL components (keys of a `StableDiffusionXLPipeline`): the original UNet under
    ``unet`` and a guidance-distilled twin under ``unet_guidance``. The tokenizers are a CLIP BPE of `vocabulary`
    (other words split into letters: several tokens per word, as CLIP's BPE splits rare words)."""
    write_tokenizer(tokenizer_dir, vocabulary, max_length=MAX_LENGTH)
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    one, two = text_encoder_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tiny=tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        parts = dict(
            tokenizer=tokenizer, tokenizer_2=tokenizer,
            text_encoder=CLIPTextModel(CLIPTextConfig(**one)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**two)),
            vae=AutoencoderKL(**vae_config(tiny=tiny, sample_size=image_size)),
            unet=UNet2DConditionModel(**unet_config(tiny=tiny, sample_size=image_size // 8)),
            unet_guidance=UNet2DConditionModel(**unet_config(tiny=tiny, sample_size=image_size // 8,
                                                             time_cond_proj_dim=GUIDANCE_DIM)),
        )
    return {k: v.to(dtype) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
