"""InstructPix2Pix (Brooks, Holynski & Efros 2023, "InstructPix2Pix: Learning to Follow Image Editing
Instructions", CVPR) as a training-based editor: a UNet whose input is widened to take the source latent beside
the noisy one, conditioned on an instruction ("make the circle blue"), sampled with two-way classifier-free
guidance (`icd.guidance.two_way_cfg`).

- `widen_unet`: the teacher's UNet with ``in_channels`` 8; conv_in's first 4 input channels are the teacher's, the
  4 new ones zero (IP2P's initialisation, so at init the model is the teacher whatever the source latent).
- `extend_text_encoder`: the IP2P model's own tokenizer (the world's words plus `INSTRUCTION_WORDS`) and text
  encoder: every token the old tokenizer had keeps its embedding row (mapped by token string), the new rows start
  at the mean of the old rows; only those rows train (IP2P froze CLIP's text encoder).
- `IP2PModel`: the folder ``<dir>/unet``, ``<dir>/text_encoder``, ``<dir>/tokenizer`` and ``<dir>/ip2p.json``
  (default guidance scales, the added vocabulary, the training summary), safetensors only. Its UNet calls are
  recorded on the pipeline model's `NFECounter`: the three guidance rows of a step are one batched call.
- `encode` / `edit`: the pipeline's ``ip2p`` method. "Inversion" only VAE-encodes the source (0 UNet calls) and
  stores the seeded initial noise; the edit runs K DDIM steps from t = 999 down `generation_timesteps(K)` with the
  instruction derived from (source prompt, target prompt) (`icd.editing.instructions`) unless one is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from icd.editing.edit import flatten_targets
from icd.editing.instructions import KINDS, edit_of, instruction
from icd.editing.inversion import Inversion
from icd.guidance import two_way_cfg
from icd.imageio import to_uint8
from icd.io import read_json, write_text_atomic
from icd.models.base import Cond, LatentDiffusion, NFECounter, PromptError, unknown_words_message
from icd.models.tiny import build_tokenizer
from icd.samplers import StopFn, ddim_loop, generation_timesteps, initial_noise, stoppable
from icd.schedule import check_steps

METHOD = "ip2p"
SUBFOLDER = "ip2p"  # default place of the weights: <model>/ip2p
SETTINGS_FILE = "ip2p.json"
DEFAULT_STEPS = 100  # IP2P's usual sampler length
DEFAULT_TEXT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE = 7.5, 1.5  # IP2P's SD defaults; a trained folder records its own
MAX_SCALE = 100.0


class IP2PError(ValueError):
    """An IP2P weights folder that is missing or incomplete (one line, naming `icd train ip2p`)."""


@dataclass(frozen=True)
class IP2PControls:
    """How an IP2P edit decodes: the instruction (None: derived from the source and target prompts), the text and
    image guidance scales s_T, s_I (classical scales, 1 = unguided; None: the folder's validated defaults)."""

    instruction: str | None = None
    text_guidance: float | None = None
    image_guidance: float | None = None

    def __post_init__(self):
        for name in ("text_guidance", "image_guidance"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and 0.0 <= v <= MAX_SCALE):
                raise ValueError(f"{name.replace('_', ' ')} (--{name.replace('_', '-')}) must lie in "
                                 f"[0, {MAX_SCALE:g}], got {v}")


# ---------------------------------------------------------------------------------------------- building
def widen_unet(unet: UNet2DConditionModel, extra: int = 4) -> UNet2DConditionModel:
    """A copy of `unet` taking ``in_channels + extra`` input channels: conv_in's old input channels copied, the new
    ones zero, every other weight the same."""
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    old = int(config["in_channels"])
    config["in_channels"] = old + extra
    wide = UNet2DConditionModel.from_config(config)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1)
    wide.load_state_dict(state)
    return wide if unet.dtype == torch.float32 else wide.to(unet.dtype)


def extend_text_encoder(tokenizer, text_encoder: CLIPTextModel, vocabulary: Sequence[str], directory: str | Path
                        ) -> tuple[CLIPTokenizer, CLIPTextModel, torch.Tensor]:
    """(tokenizer of `vocabulary` written to `directory`, a text encoder with its embedding rows, the ids of the rows
    that are new). Old tokens keep their rows, found by token string; new rows are the mean of the old ones."""
    new_tok = build_tokenizer(directory, vocabulary)
    old_vocab, new_vocab = tokenizer.get_vocab(), new_tok.get_vocab()
    config = text_encoder.config.to_dict() | {"vocab_size": len(new_tok), "bos_token_id": new_tok.bos_token_id,
                                              "eos_token_id": new_tok.eos_token_id,
                                              "pad_token_id": new_tok.pad_token_id}
    config.pop("_name_or_path", None)
    encoder = CLIPTextModel(type(text_encoder.config).from_dict(config))
    state = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    key = next(k for k in state if k.endswith("token_embedding.weight"))  # with or without a text_model. prefix
    old_rows = state[key]
    rows = old_rows.mean(dim=0, keepdim=True).repeat(len(new_tok), 1)
    new_ids = []
    for token, i in new_vocab.items():
        if token in old_vocab:
            rows[i] = old_rows[old_vocab[token]]
        else:
            new_ids.append(i)
    state[key] = rows
    encoder.load_state_dict(state)
    encoder = encoder if text_encoder.dtype == torch.float32 else encoder.to(text_encoder.dtype)
    return new_tok, encoder, torch.tensor(sorted(new_ids), dtype=torch.long)


def save_folder(directory: str | Path, *, unet, tokenizer, text_encoder, settings: dict) -> Path:
    """Write the IP2P folder (safetensors, no pickles); `settings` becomes ip2p.json."""
    directory = Path(directory)
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    write_text_atomic(directory / SETTINGS_FILE, json.dumps(settings, indent=1) + "\n")
    return directory


# ---------------------------------------------------------------------------------------------- the model
class IP2PModel:
    """The widened UNet with its instruction tokenizer and text encoder; the VAE is the pipeline model's."""

    def __init__(self, *, unet, tokenizer, text_encoder, settings: dict, counter: NFECounter,
                 path: Path | None = None):
        self.unet = unet.eval().requires_grad_(False)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        self.settings, self.counter, self.path = settings, counter, path
        self.vocabulary = tuple(settings["vocabulary"])
        self._empty: torch.Tensor | None = None

    @classmethod
    def load(cls, path: str | Path, *, model: LatentDiffusion) -> IP2PModel:
        """The folder `path` on `model`'s device and dtype, counting on its counter; `IP2PError` when it is missing
        or lacks a part."""
        path = Path(path)
        hint = "train one with `icd train ip2p --config configs/embedded.toml` or pass --ip2p DIR"
        if not path.is_dir():
            raise IP2PError(f"IP2P weights folder not found: {path}; {hint}")
        missing = [p for p in ("unet", "text_encoder", "tokenizer", SETTINGS_FILE) if not (path / p).exists()]
        if missing:
            raise IP2PError(f"{path} is not an IP2P weights folder (lacks {', '.join(missing)}); {hint}")
        try:
            settings = read_json(path / SETTINGS_FILE)
            unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=model.dtype, use_safetensors=True)
            text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=model.dtype,
                                                         use_safetensors=True)
            tokenizer = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
        except (OSError, ValueError, RuntimeError) as e:
            raise IP2PError(f"cannot load the IP2P weights in {path}: {str(e).strip().splitlines()[0]}") from None
        if not isinstance(settings, dict) or "vocabulary" not in settings:
            raise IP2PError(f"{path / SETTINGS_FILE}: no vocabulary; {hint}")
        return cls(unet=unet.to(model.device), tokenizer=tokenizer, text_encoder=text_encoder.to(model.device),
                   settings=settings, counter=model.counter, path=path)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def guidance(self, controls: IP2PControls) -> tuple[float, float]:
        """(s_T, s_I): the controls', else the folder's validated defaults, else IP2P's SD defaults."""
        s_t = controls.text_guidance if controls.text_guidance is not None else self.settings.get(
            "text_guidance", DEFAULT_TEXT_GUIDANCE)
        s_i = controls.image_guidance if controls.image_guidance is not None else self.settings.get(
            "image_guidance", DEFAULT_IMAGE_GUIDANCE)
        return float(s_t), float(s_i)

    def check_instructions(self, texts: Sequence[str]) -> None:
        """PromptError (one line, closest known words) for an empty instruction or one with unknown words."""
        known = set(self.vocabulary)
        if any(not t.strip() for t in texts):
            raise PromptError("an instruction is empty")
        unknown = list(dict.fromkeys(w for t in texts for w in t.lower().split() if w not in known))
        if unknown:
            raise PromptError("instruction: " + unknown_words_message(unknown, self.vocabulary))

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Token embeddings [B, L, D] of instructions (the empty string: the unconditional text)."""
        if any(t.strip() for t in texts):
            self.check_instructions([t for t in texts if t.strip()])
        ids = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def eps(self, x: torch.Tensor, t, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One UNet call on concat(x_t, image latent) along channels, counted."""
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        self.counter.record(x.shape[0])
        dtype = next(self.unet.parameters()).dtype
        return self.unet(torch.cat([x, image], dim=1).to(dtype), t, encoder_hidden_states=tokens.to(dtype)
                         ).sample.to(x.dtype)

    @torch.no_grad()
    def sample(self, z_src: torch.Tensor, instructions: Sequence[str], noise: torch.Tensor, *, steps: int,
               text_guidance: float, image_guidance: float, schedule, should_stop: StopFn | None = None
               ) -> torch.Tensor:
        """Clean latents edited from source latents `z_src` [B, 4, h, w]: DDIM over `generation_timesteps(steps)`
        from `noise` at t = 999, two-way CFG with rows [(c_I, c_T); (c_I, 0); (0, 0)] in one UNet call per step."""
        n = z_src.shape[0]
        text = self.encode(list(instructions))
        empty = self.encode([""] * n)
        tokens = torch.cat([text, empty, empty])
        image = torch.cat([z_src, z_src, torch.zeros_like(z_src)])

        def eps(x, t, _cond):
            full, image_only, uncond = self.eps(torch.cat([x, x, x]), t, image, tokens).chunk(3)
            return two_way_cfg(uncond, image_only, full, image_scale=image_guidance, text_scale=text_guidance)

        return ddim_loop(stoppable(eps, should_stop), noise, Cond(tokens=text), generation_timesteps(steps),
                         schedule=schedule).final


# ---------------------------------------------------------------------------------------------- the method
def encode(model: LatentDiffusion, z0: torch.Tensor, prompts: Sequence[str], *, steps: int, seed: int) -> Inversion:
    """IP2P's record (0 UNet calls): the source latents and the seeded noise the sampler starts from at t = 999."""
    check_steps(steps, model.schedule.num_timesteps)
    noise = initial_noise(z0.shape[1:], [seed] * z0.shape[0], z0.device)
    return Inversion(latents=[z0, noise], timesteps=[0, model.schedule.num_timesteps - 1], prompts=list(prompts),
                     method=METHOD, settings={"seed": seed, "steps": steps, "model": model.name})


def check_record(inversion: Inversion, model: LatentDiffusion) -> int:
    """The step count of an IP2P record; ValueError when it is malformed."""
    steps = inversion.settings.get("steps")
    if (isinstance(steps, bool) or not isinstance(steps, int) or len(inversion.latents) != 2
            or list(inversion.timesteps) != [0, model.schedule.num_timesteps - 1]):
        raise ValueError("this IP2P record is malformed: [source latent, noise] at [0, T - 1] and a step count "
                         "expected")
    check_steps(steps, model.schedule.num_timesteps)
    return steps


def instruction_of(source: str, target: str, given: str | None = None) -> str:
    """`given`, else the instruction of the world edit `source` -> `target` (its kind found from the word diff)."""
    if given is not None:
        return given
    for kind in KINDS:
        try:
            edit_of(source, target, kind)
        except ValueError:
            continue
        return instruction(source, target, kind)
    raise PromptError(f"no instruction for {source!r} -> {target!r}: the prompts are not world captions that differ "
                      "in one colour, shape, size or background word; pass --instruction")


def edit(ip2p: IP2PModel, model: LatentDiffusion, inversion: Inversion, target_prompts, *,
         controls: IP2PControls | None = None, should_stop: StopFn | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (edited images [T, H, W, 3], sources [S, H, W, 3]: the VAE round trip of the latents IP2P reads) of an
    IP2P edit of `inversion` (`encode`) to `target_prompts` (one or a list per source)."""
    controls = controls or IP2PControls()
    if not isinstance(controls, IP2PControls):
        raise ValueError("an IP2P edit takes IP2PControls (an instruction and two guidance scales), no attention "
                         "control")
    steps = check_record(inversion, model)
    sources = list(inversion.prompts)
    targets, source_of = flatten_targets(target_prompts, len(sources))
    if controls.instruction is not None and len(targets) != 1:
        raise ValueError("one --instruction applies to one target; leave it out to derive one per target")
    texts = [instruction_of(sources[int(s)], t, controls.instruction) for s, t in zip(source_of, targets)]
    ip2p.check_instructions(texts)
    s_t, s_i = ip2p.guidance(controls)
    z_src, noise = inversion.latents[0], inversion.latents[1]
    z0 = ip2p.sample(z_src[source_of], texts, noise[source_of], steps=steps, text_guidance=s_t,
                     image_guidance=s_i, schedule=model.schedule, should_stop=should_stop)
    return to_uint8(model.decode_latents(z0)), to_uint8(model.decode_latents(z_src))
