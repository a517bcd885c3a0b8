"""The SD3 / SD3.5 family: a `StableDiffusion3Pipeline` folder behind the one convention (docs/flow.md §5, §7).

What differs from FLUX, and lives only here:
- **Text.** Three encoders, as `StableDiffusion3Pipeline.encode_prompt` combines them: CLIP-L (``text_encoder``) and
  CLIP-G (``text_encoder_2``), both `CLIPTextModelWithProjection`, give their penultimate hidden states (concatenated
  along features, zero-padded to T5's width) and their projected pooled outputs (concatenated: [B, D_pool]); T5
  (``text_encoder_3``) gives its last hidden states, padded to the folder's T5 length (``text_length.json``, else 256
  as the pipeline's default). The sequence is [CLIP tokens; T5 tokens], [B, 77 + L, D]. A folder without T5
  (diffusers allows ``text_encoder_3=None``) reads zeros in its place, as the pipeline does.
- **Latents.** The transformer (`SD3Transformer2DModel`) reads the VAE's latents [B, C, h, w] unpacked (its own patch
  embedding); its ``timestep`` is 1000·s.
- **Time.** The static shift of the folder's `FlowMatchEulerDiscreteScheduler` (3.0 for SD3 / SD3.5):
  `icd.schedule.DiscreteFlowSchedule.shifted`. `StableDiffusion3Pipeline`'s own default grid is
  shift(linspace(1, shift(1/1000), n)); ours is FLUX's shift(linspace(1, 1/n, n)) (pass ``sigmas`` to the pipeline
  to get ours).
- **Guidance.** No guidance embedding: two-pass CFG against the empty prompt (the pipeline's ``guidance_scale``:
  1 + w). A guidance-distilled SD3 (`icd train guidance`) is diffusers' transformer plus our `SD3GuidanceEmbedder`,
  whose e(1 + w) is added to ``pooled_projections`` (``transformer_guidance/``: diffusers' folder + the embedder's).
- **VAE.** latents = (posterior mean − shift_factor) · scaling_factor (`LatentDiffusion.encode_images`).
- **Size.** The native size is the VAE's ``sample_size`` (1024 for SD3 / SD3.5); sides are multiples of the VAE
  factor × the patch size (16).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from icd.models import flux_embedded as fe
from icd.models import tiny
from icd.models.base import Cond
from icd.models.flow import FlowDiffusion
from icd.models.tiny import VOCABULARY_FILE
from icd.schedule import DiscreteFlowSchedule

PIPELINE_CLASS = "StableDiffusion3Pipeline"
KIND = "flow"  # a rectified-flow family (`LatentDiffusion.kind`)
COMPONENTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "vae", "transformer", "scheduler")
OPTIONAL = ("tokenizer_3", "text_encoder_3")  # T5: diffusers allows None (zeros in its place)
NATIVE_SIZE = 1024
SIZE_MULTIPLE = 16  # VAE factor 8 x patch 2
T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length
GUIDANCE = {"edit": 6.0, "generate": 6.0}  # no distilled SD3: the base model's codes
BASE_GUIDANCE = 6.0  # StableDiffusion3Pipeline's default guidance_scale 7.0 (code w = 6)
TAU = None
BOUNDARIES = "4step-1"
DENOISER = "transformer"  # the pipeline folder's network
GUIDANCE_SUBFOLDER = "transformer_guidance"  # the guidance-distilled transformer (`icd train guidance`)
EMBEDDER_FILE = "guidance_embedder.safetensors"  # its weights, beside the transformer's in its folder
EMBEDDER_CONFIG = "guidance_embedder.json"  # its sizes
# The modules the iCD adapters wrap: attention and MLP projections of both streams and the adaLN modulations.
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
    "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear",
    "norm_out.linear", "proj_out",
)


class SD3Diffusion(FlowDiffusion):
    """SD3: `encode_prompt` gives [CLIP-L ⊕ CLIP-G (padded); T5] tokens [B, 77 + L, D] and the pooled CLIPs."""

    family = "sd3"

    def __init__(self, *, tokenizer_2, text_encoder_2, tokenizer_3=None, text_encoder_3=None,
                 max_sequence_length: int = T5_LENGTH, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = None if text_encoder_3 is None else text_encoder_3.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length

    def _clip(self, tokenizer, encoder, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states [B, 77, D_i], projected pooled output [B, D_pool_i]) of one CLIP."""
        out = encoder(self.token_ids(tokenizer, prompts), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, prompts: Sequence[str]) -> torch.Tensor:
        """T5's last hidden states [B, L, D], or zeros [B, L, joint_attention_dim] without T5 (as the pipeline)."""
        if self.text_encoder_3 is None:
            width = int(self.unet.config.joint_attention_dim)
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=self.device,
                               dtype=self.text_encoder.dtype)
        ids = self.tokenizer_3(list(prompts), padding="max_length", max_length=self.max_sequence_length,
                               truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.device))[0]

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """What `StableDiffusion3Pipeline.encode_prompt` computes (module docstring)."""
        self.check_prompts(prompts)
        clip_l, pooled_l = self._clip(self.tokenizer, self.text_encoder, prompts)
        clip_g, pooled_g = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        t5 = self._t5(prompts)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        tokens = torch.cat([clip, t5.to(clip.dtype)], dim=-2)
        return Cond(tokens=tokens.to(self.dtype), pooled=torch.cat([pooled_l, pooled_g], dim=-1).to(self.dtype))

    @property
    def guidance_distilled(self) -> bool:
        """True when the transformer carries an `SD3GuidanceEmbedder` as ``guidance_embedder`` (`guidance_student`)."""
        return isinstance(getattr(self.unet, "guidance_embedder", None), SD3GuidanceEmbedder)

    def velocity(self, x: torch.Tensor, s: torch.Tensor, cond: Cond, *, guidance: torch.Tensor | None
                 ) -> torch.Tensor:
        pooled = cond.pooled.to(x.device, self.dtype)
        if guidance is not None:  # guidance-distilled: e(1 + w) joins the pooled text vector (SD3GuidanceEmbedder)
            pooled = pooled + self.unet.guidance_embedder(guidance).to(pooled.dtype)
        return self.unet(hidden_states=x, timestep=(s * 1000.0).to(self.dtype),
                         encoder_hidden_states=cond.tokens.to(x.device, self.dtype),
                         pooled_projections=pooled, return_dict=False)[0]


# ----------------------------------------------------------------------------------------- guidance distillation
class SD3GuidanceEmbedder(torch.nn.Module):
    """The guidance input SD3 lacks: e(w) = MLP(sinusoids(1000 · (1 + w))) in the pooled-text space [B, D_pool].

    The embedding is FLUX.1-dev's (diffusers' `Timesteps(256, flip_sin_to_cos=True)` of 1000 × the scale, then a
    `TimestepEmbedding` Linear–SiLU–Linear), except that its output Linear maps to the transformer's
    ``pooled_projection_dim`` and starts at zero. `SD3Diffusion.velocity` adds it to ``pooled_projections``.

    Why the pooled input: SD3's transformer has one global conditioning vector, temb = time_embed(t) +
    text_proj(pooled) (`CombinedTimestepTextProjEmbeddings`), which drives every block's adaLN shift / scale / gate
    and the output norm; FLUX.1-dev adds its guidance embedding to the same sum. Besides the timestep, the pooled
    vector is the only input of diffusers' SD3 transformer that reaches that path, so e(w) on it conditions the adaLN
    modulations on w without changing diffusers' module (the difference from FLUX: it passes through ``text_proj``'s
    MLP first). With the output layer at zero, e(w) = 0 for every w: the student equals its teacher exactly at
    initialisation, and the first layer gets gradients once the output layer moves."""

    def __init__(self, pooled_projection_dim: int, hidden_dim: int, frequency_dim: int = 256):
        super().__init__()
        self.sizes = {"pooled_projection_dim": pooled_projection_dim, "hidden_dim": hidden_dim,
                      "frequency_dim": frequency_dim}
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedder = TimestepEmbedding(frequency_dim, hidden_dim, out_dim=pooled_projection_dim)
        torch.nn.init.zeros_(self.embedder.linear_2.weight)
        torch.nn.init.zeros_(self.embedder.linear_2.bias)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        """e for guidance scales 1 + w [B] (float32 sinusoids, as FLUX embeds 1000 · scale) -> [B, D_pool]."""
        proj = self.time_proj(scale.float() * 1000.0)
        return self.embedder(proj.to(self.embedder.linear_1.weight.dtype))

    def save(self, folder: Path) -> None:
        """`EMBEDDER_FILE` (weights) and `EMBEDDER_CONFIG` (sizes) in `folder`."""
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(folder / EMBEDDER_FILE))
        (folder / EMBEDDER_CONFIG).write_text(json.dumps(self.sizes, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, *, dtype: torch.dtype) -> SD3GuidanceEmbedder:
        embedder = cls(**json.loads((folder / EMBEDDER_CONFIG).read_text()))
        embedder.load_state_dict(load_file(str(folder / EMBEDDER_FILE)))
        return embedder.to(dtype)


def save_denoiser(transformer: SD3Transformer2DModel, folder: Path) -> None:
    """`transformer` as diffusers' folder (its weights file holds the transformer alone: diffusers loads it without
    icd), plus `EMBEDDER_FILE` and `EMBEDDER_CONFIG` beside it when it carries a guidance embedder (`denoiser` reads
    both back; `icd.train.guidance` saves the student with it)."""
    embedder = getattr(transformer, "guidance_embedder", None)
    if embedder is None:
        transformer.save_pretrained(folder)
        return
    del transformer.guidance_embedder  # out of the state dict while diffusers writes the transformer's files
    try:
        transformer.save_pretrained(folder)
    finally:
        transformer.guidance_embedder = embedder
    embedder.save(Path(folder))


def guidance_student(teacher: SD3Transformer2DModel) -> SD3Transformer2DModel:
    """The guidance student of `teacher` (`icd.distill.guidance.init_student_from_teacher`): a copy of diffusers'
    transformer carrying a zero-output `SD3GuidanceEmbedder` as ``guidance_embedder`` (a submodule: LoRA,
    `with_unet`, the optimizer and the checkpoints see one network), equal to the teacher at every w before training.
    Save it with `save_denoiser`."""
    if isinstance(getattr(teacher, "guidance_embedder", None), SD3GuidanceEmbedder):
        raise ValueError("teacher: this SD3 transformer already embeds a guidance scale (guidance-distilled)")
    student = SD3Transformer2DModel.from_config(teacher.config)
    student.load_state_dict(teacher.state_dict())  # strict: the same transformer
    config = teacher.config
    student.guidance_embedder = SD3GuidanceEmbedder(
        int(config.pooled_projection_dim), int(config.num_attention_heads) * int(config.attention_head_dim))
    dtype = next(teacher.parameters()).dtype
    return student if dtype == torch.float32 else student.to(dtype=dtype)  # (a no-op cast makes diffusers warn)


def schedule_for(scheduler_config: dict) -> DiscreteFlowSchedule:
    """The flow schedule at the scheduler config's static ``shift`` (ValueError for dynamic shifting)."""
    if scheduler_config.get("use_dynamic_shifting", False):
        raise ValueError("an SD3 scheduler with dynamic shifting is not supported (SD3 / SD3.5 use a static shift)")
    return DiscreteFlowSchedule.shifted(float(scheduler_config.get("shift", 1.0)))


def denoiser(path: Path, *, dtype: torch.dtype, subfolder: str = DENOISER) -> SD3Transformer2DModel:
    """The transformer in ``<path>/<subfolder>`` (the folder's own, or its guidance-distilled one: with its
    ``guidance_embedder`` attached where `EMBEDDER_FILE` is beside it), safetensors only."""
    folder = path / subfolder
    transformer = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
    if (folder / EMBEDDER_FILE).is_file():
        transformer.guidance_embedder = SD3GuidanceEmbedder.load(folder, dtype=dtype)
    return transformer


def load(path: Path, *, dtype: torch.dtype, name: str, transformer=None, subfolder: str = DENOISER) -> SD3Diffusion:
    """The `StableDiffusion3Pipeline` folder `path` (diffusers layout), safetensors only; T5 where the folder has it;
    `transformer`: another network in place of ``<path>/<subfolder>`` (default the folder's own ``transformer``)."""
    if transformer is None:
        transformer = denoiser(path, dtype=dtype, subfolder=subfolder)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, use_safetensors=True)
    scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    vocabulary_file = path / VOCABULARY_FILE  # a closed-vocabulary model: prompts are checked against it
    vocabulary = json.loads(vocabulary_file.read_text()) if vocabulary_file.is_file() else None
    length_file = path / fe.TEXT_LENGTH_FILE
    length = json.loads(length_file.read_text())["max_sequence_length"] if length_file.is_file() else T5_LENGTH
    has_t5 = (path / "text_encoder_3").is_dir() and (path / "tokenizer_3").is_dir()
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def clip(sub: str) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection.from_pretrained(path / sub, torch_dtype=dtype, use_safetensors=True)

    return SD3Diffusion(
        tokenizer=CLIPTokenizer.from_pretrained(path / "tokenizer"), text_encoder=clip("text_encoder"),
        tokenizer_2=CLIPTokenizer.from_pretrained(path / "tokenizer_2"), text_encoder_2=clip("text_encoder_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(path / "tokenizer_3") if has_t5 else None,
        text_encoder_3=T5EncoderModel.from_pretrained(path / "text_encoder_3", torch_dtype=dtype,
                                                      use_safetensors=True) if has_t5 else None,
        vae=vae, unet=transformer, schedule=schedule_for(scheduler), name=name,
        image_size=int(vae.config.sample_size), vocabulary=vocabulary,
        size_multiple=vae_factor * int(transformer.config.patch_size), max_sequence_length=length)


# ----------------------------------------------------------------------------------------------- tiny random folders
@dataclass(frozen=True)
class SD3Size:
    """A tiny SD3 for tests: CLIP-L / CLIP-G widths (unequal, so the padding to T5's width is exercised), the
    transformer's blocks and heads; ``dual_attention_layers`` / ``qk_norm`` as SD3.5-medium (its ``attn2``)."""

    clip_l: int = 16
    clip_g: int = 32
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 16
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None


LATENT_CHANNELS = 16  # SD3's VAE
VAE_SHIFT, VAE_SCALE = 0.0609, 1.5305  # SD3's VAE config values


def _clip_encoder(tokenizer, width: int) -> CLIPTextModelWithProjection:
    config = tiny.text_encoder_config(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.update(hidden_size=width, intermediate_size=4 * width, projection_dim=width, num_attention_heads=2)
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def build_random_pipeline(directory: str | Path, *, vocabulary: Sequence[str], size: SD3Size = SD3Size(),
                          t5: bool = True, seed: int = 0) -> Path:
    """A randomly initialised `StableDiffusion3Pipeline` folder (for tests; no download): 64² images, a 3-level VAE
    with 16 latent channels (64x64x3 <-> 16x16x16, SD3's shift and scale), patch 2 (8 x 8 image tokens), world-word
    tokenizers, T5 of `fe.TEXT_LENGTH` tokens (``text_length.json``) or none; shift 3. No vocabulary file: prompts are
    not checked (as a real folder)."""
    from diffusers import StableDiffusion3Pipeline  # its import pulls in transformers' image processors (slow)

    directory = Path(directory)
    torch.manual_seed(seed)
    tok = tiny.build_tokenizer(directory / "_tokenizer", vocabulary)
    t5_tok = fe.build_t5_tokenizer(directory / "_tokenizer_3", vocabulary) if t5 else None
    vae = AutoencoderKL(**{**tiny.vae_config(), "latent_channels": LATENT_CHANNELS, "shift_factor": VAE_SHIFT,
                           "scaling_factor": VAE_SCALE, "use_quant_conv": False, "use_post_quant_conv": False})
    transformer = SD3Transformer2DModel(
        sample_size=tiny.LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=size.num_layers, attention_head_dim=size.attention_head_dim,
        num_attention_heads=size.num_attention_heads, joint_attention_dim=fe.T5_DIM,
        caption_projection_dim=size.num_attention_heads * size.attention_head_dim,
        pooled_projection_dim=size.clip_l + size.clip_g, pos_embed_max_size=16,
        dual_attention_layers=tuple(size.dual_attention_layers), qk_norm=size.qk_norm)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip_encoder(tok, size.clip_l), tokenizer=tok, text_encoder_2=_clip_encoder(tok, size.clip_g),
        tokenizer_2=tok, text_encoder_3=fe.build_t5(t5_tok) if t5 else None, tokenizer_3=t5_tok)
    pipe.save_pretrained(directory)
    for sub in ("tokenizer", "tokenizer_2"):
        tiny.write_tokenizer_files(directory / sub, vocabulary)
    (directory / fe.TEXT_LENGTH_FILE).write_text(json.dumps({"max_sequence_length": fe.TEXT_LENGTH}) + "\n")
    for sub in ("_tokenizer", "_tokenizer_3"):
        shutil.rmtree(directory / sub, ignore_errors=True)
    return directory
