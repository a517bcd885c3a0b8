"""The one calling convention every sampler, loss and editor sees, and the latent-diffusion model bundle.

- `Cond`: the text conditioning of a batch (token embeddings; pooled embeddings and size ids for SDXL later).
- `LatentDiffusion`: tokenizer + text encoder + VAE + UNet + schedule, with `encode_prompt`, `encode_images`,
  `decode_latents` and `eps(x_t, t, cond, guidance=None)`. SD1.5 / SDXL adapters subclass it.
- `NFECounter`: counts UNet evaluations (and their batch sizes) by wrapping the call, never by assumption.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from icd.schedule import NoiseSchedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cond:
    tokens: torch.Tensor  # (B, L, D) text encoder hidden states
    pooled: torch.Tensor | None = None  # (B, D_pool) for SDXL
    extra: dict = field(default_factory=dict)  # model-specific inputs (e.g. SDXL time ids)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, idx) -> Cond:
        return replace(self, tokens=self.tokens[idx], pooled=None if self.pooled is None else self.pooled[idx],
                       extra={k: v[idx] for k, v in self.extra.items()})

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        first = conds[0]
        return Cond(
            tokens=torch.cat([c.tokens for c in conds]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in conds]),
            extra={k: torch.cat([c.extra[k] for c in conds]) for k in first.extra},
        )


@dataclass
class NFECounter:
    """Counts network evaluations: `calls` (one per UNet call) and `batch_sizes`."""

    calls: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def record(self, batch: int) -> None:
        self.calls += 1
        self.batch_sizes.append(batch)

    def reset(self) -> None:
        self.calls = 0
        self.batch_sizes.clear()


class PromptError(ValueError):
    """A prompt the model cannot take (unknown words, empty)."""


class LatentDiffusion:
    """A latent diffusion model behind the `EpsModel` convention (epsilon prediction only)."""

    def __init__(self, *, tokenizer, text_encoder, vae, unet, schedule: NoiseSchedule, name: str,
                 image_size: int, vocabulary: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule
        self.name = name
        self.image_size = image_size
        self.vocabulary = None if vocabulary is None else tuple(vocabulary)
        self.counter = NFECounter()
        self.icd = None  # an `icd.models.embedded.ICDSpec` once iCD adapters are attached (`load_icd_model`)
        self.fused = None  # an `icd.models.lora.FusedAdapters` when the adapters are folded into the weights

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def guidance_distilled(self) -> bool:
        """True when the UNet takes the guidance embedding (a 512-d time-conditioning projection)."""
        return self.unet.config.time_cond_proj_dim is not None

    # ------------------------------------------------------------------ text
    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise `PromptError` for prompts this model cannot read (words outside a closed vocabulary)."""
        if self.vocabulary is None:
            return
        from icd.world import unknown_words_message

        known = set(self.vocabulary)
        unknown = list(dict.fromkeys(w for p in prompts for w in p.lower().split() if w not in known))
        if unknown:
            raise PromptError(unknown_words_message(unknown))

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """Token embeddings of `prompts` (padded to the tokenizer's max length; longer prompts are truncated)."""
        self.check_prompts(prompts)
        limit = self.tokenizer.model_max_length
        for p, ids in zip(prompts, self.tokenizer(list(prompts)).input_ids):
            if len(ids) > limit:
                log.warning("prompt truncated to %d tokens (it has %d): %r", limit, len(ids), p)
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return Cond(tokens=self.text_encoder(ids)[0].to(self.dtype))

    # ------------------------------------------------------------------ images
    def preprocess(self, images) -> torch.Tensor:
        """uint8 [N,H,W,3] array / list of PIL images / float tensor in [-1,1] -> float [N,3,S,S] on device."""
        if isinstance(images, torch.Tensor):
            x = images.float()
        else:
            if not isinstance(images, np.ndarray):
                images = np.stack([np.asarray(im.convert("RGB")) for im in images])
            x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = torch.nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                                align_corners=False, antialias=True).clamp(-1, 1)
        return x.to(self.device)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Images -> clean latents z0 = posterior mean x scaling factor (method.md §8.1)."""
        x = self.preprocess(images).to(self.vae.dtype)
        return self.vae.encode(x).latent_dist.mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z0: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images, float [N,3,H,W] in [-1, 1]."""
        return self.vae.decode(z0.to(self.vae.dtype) / self.scaling_factor).sample.float().clamp(-1, 1)

    # ------------------------------------------------------------------ network
    def use_adapter(self, name: str | None) -> None:
        """Select the iCD adapter for the next UNet calls (None: the base UNet); a no-op without adapters."""
        if self.icd is None:
            if name is not None:
                raise ValueError(f"adapter {name!r} requested but this model has no iCD adapters")
            return
        if self.fused is not None:
            self.fused.activate(name)
            return
        from icd.models import lora

        lora.use(self.unet, name)

    def eps(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: Cond, *, guidance: torch.Tensor | None = None
            ) -> torch.Tensor:
        """One UNet evaluation: eps_hat(x_t, t, c[, e(w)]). `guidance` ([B] codes) needs a distilled UNet."""
        from icd.guidance import guidance_embedding

        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs = {}
        if self.guidance_distilled:
            w = torch.zeros(x_t.shape[0]) if guidance is None else torch.as_tensor(guidance).float()
            w = w.expand(x_t.shape[0]) if w.ndim == 0 else w
            kwargs["timestep_cond"] = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(
                x_t.device, self.dtype)
        elif guidance is not None and bool(torch.any(torch.as_tensor(guidance) != 0)):
            raise ValueError("this UNet is not guidance-distilled; use two-pass CFG (icd.sampling.CFGEps)")
        self.counter.record(x_t.shape[0])
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.tokens, **kwargs).sample
        return out.to(x_t.dtype)
