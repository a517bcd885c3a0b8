"""The one calling convention every sampler, loss and editor sees, and the latent-diffusion model bundle.

- `EpsFn`: the convention, ``eps(x_t, t, cond) -> eps_hat``. A model hands one out with
  ``model.eps_fn(adapter=..., guidance=w, tau=tau)``: which adapter, which guidance code and which dynamic-CFG
  threshold are arguments of the function, never a mode switched on the model.
- `guided_eps`: two-pass classifier-free guidance around any `EpsFn`, one row order ``[uncond; cond]``.
- `Cond`: the text conditioning of a batch (token embeddings; pooled embeddings and size ids for SDXL).
- `LatentDiffusion`: tokenizer + text encoder + VAE + UNet + schedule, with `encode_prompt`, `encode_images`,
  `decode_latents` and `eps_fn`. Model families subclass it or build it from their components.
- `NFECounter`: counts UNet evaluations (and their batch sizes) by wrapping the call, never by assumption.
"""

from __future__ import annotations

import copy
import difflib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from icd.boundaries import Boundaries
from icd.guidance import dynamic_guidance, guidance_embedding
from icd.models import lora
from icd.schedule import NoiseSchedule
from icd.solver import cfg_combine

log = logging.getLogger(__name__)
DEVICE_CACHE_MAX = 4096  # cached per-call UNet inputs (timesteps x batch sizes, guidance embeddings, size ids)


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

    def to(self, device) -> Cond:
        """The same conditioning with every tensor on `device`."""
        return replace(self, tokens=self.tokens.to(device), pooled=None if self.pooled is None else
                       self.pooled.to(device), extra={k: v.to(device) for k, v in self.extra.items()})

    @staticmethod
    def cat(conds: Sequence[Cond]) -> Cond:
        first = conds[0]
        return Cond(
            tokens=torch.cat([c.tokens for c in conds]),
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in conds]),
            extra={k: torch.cat([c.extra[k] for c in conds]) for k in first.extra},
        )


@dataclass(frozen=True)
class ICDSpec:
    """What a pair of trained iCD adapters needs at inference: their boundaries and recommended tau."""

    path: Path
    boundaries: Boundaries
    tau: float | None
    w_set: tuple[float, ...]
    reverse_adapter: bool = True  # False: the model's own network decodes (a few-step generator: FLUX.1-schnell)


class EpsFn(Protocol):
    """The one calling convention: the noise prediction eps_hat(x_t, t, c) of a batch, t an integer or one per row.
    Which network, adapter, guidance code and dynamic-CFG threshold it computes is fixed when it is made
    (`LatentDiffusion.eps_fn`), never switched on the model."""

    def __call__(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: Cond, /) -> torch.Tensor: ...


GuidedEps = Callable[[torch.Tensor], EpsFn]  # per-row guidance codes w [B] -> that network's eps function (losses)


def guidance_codes(w: torch.Tensor | float, n: int) -> torch.Tensor:
    """Guidance codes as a float32 [n] tensor (a float applies to every row)."""
    return torch.as_tensor(w, dtype=torch.float32).expand(n).clone()


def guided_eps(eps: EpsFn, w: torch.Tensor | float, *, tau: float | None = None,
               uncond: Cond | Callable[[int], Cond]) -> EpsFn:
    """Classifier-free guidance with code w around `eps` (docs/method.md §1, §7): one call on ``[uncond; cond]``,
    combined per row as eps_c + w(t) (eps_c - eps_u) with dynamic CFG w(t) = 0 for t / 1000 > tau.

    `uncond` is the unconditional batch, or a function of the timestep giving it (null-text inversion's per-step
    embeddings). Where every row's w(t) is 0 the step is one plain call on `cond` (no unconditional half).
    """

    def guided(x: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        w_t = dynamic_guidance(t, guidance_codes(w, len(cond)), tau)
        if bool(torch.all(w_t == 0)):
            return eps(x, t, cond)
        u = uncond(int(t)) if callable(uncond) else uncond
        t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim else t  # per-row times, both halves
        eps_u, eps_c = eps(torch.cat([x, x]), t2, Cond.cat([u, cond])).chunk(2)
        return cfg_combine(eps_c, eps_u, w_t.to(x.device))

    return guided


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
    """A latent diffusion model behind the `EpsFn` convention (epsilon prediction only)."""

    family = "sd15"  # the model family (icd.models.sd15 / icd.models.sdxl); subclasses override
    kind = "vp"  # epsilon prediction on a VP schedule; "flow": a rectified-flow model (icd.models.flow)

    def __init__(self, *, tokenizer, text_encoder, vae, unet, schedule: NoiseSchedule, name: str,
                 image_size: int, vocabulary: Sequence[str] | None = None, size_multiple: int | None = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule
        self.name = name
        self.image_size = image_size  # the native resolution (the side of a square image)
        self.size_multiple = size_multiple  # None: images are size x size; else any size with sides a multiple
        self.vocabulary = None if vocabulary is None else tuple(vocabulary)  # a closed vocabulary (world models)
        self.counter = NFECounter()
        self.icd = None  # an `ICDSpec` once iCD adapters are attached (`load_icd_model`)
        self.fused = None  # an `icd.models.lora.FusedAdapters` when the adapters are folded into the weights
        self.trainable_adapters: tuple[str, ...] = ()  # adapters whose LoRA weights train (peft's set_adapter
        # would freeze the inactive one; `icd.models.lora.use`)
        self._empty: dict[tuple[int, str], Cond] = {}  # encoded empty prompts by batch size (a cache)
        self._device_cache: dict = {}  # per-call UNet inputs built once on the device (timesteps, e(w), size ids)
        self.compiled = None  # an `icd.models.compiled.CompiledUNet` of `unet` (`compile`): the no-grad calls' path
        # a half-precision VAE whose output overflowed is re-run in fp32 (`vae_call`); shared by `with_unet` copies
        self.vae_upcast = False  # SDXL's VAE in fp16 without an fp16-safe VAE (`icd.models.sdxl`)
        self._vae_state: dict = {"upcasts": 0}  # the fp32 copy (made on the first overflow) and the re-runs counted
        # where the networks compute when their weights wait on the CPU between calls (`icd.models.memory`)
        self.execution_device: torch.device | None = None

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """Where latents and inputs go: the execution device of an offloaded model, else the UNet's weights'."""
        if self.execution_device is not None:
            return self.execution_device
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        """The VAE config's latent shift (SD3's and FLUX.1's VAEs; 0 where None or absent, as for SD)."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel along a side (8 for Stable Diffusion)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_fit(self) -> str:
        """The `icd.imageio.fit_image` policy for photos: squares for fixed-size models, else keep the aspect."""
        return "resize" if self.size_multiple is None else "aspect"

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of that size (default: the native square)."""
        height, width = height or self.image_size, width or self.image_size
        return (int(self.unet.config.in_channels), height // self.vae_factor, width // self.vae_factor)

    def with_unet(self, unet) -> LatentDiffusion:
        """The same model (tokenizer, text encoder, VAE, NFE counter) around another UNet, adapters detached."""
        other = copy.copy(self)
        other.unet = unet.eval().requires_grad_(False)
        other.icd, other.fused, other.trainable_adapters = None, None, ()
        other._empty, other._device_cache, other.compiled = {}, {}, None
        return other

    def compile(self, mode: str | bool | None = "auto", *, backend: str = "inductor") -> None:
        """Run the UNet's no-grad calls through ``torch.compile`` (`icd.models.compiled`; mode None: eager again)."""
        from icd.models.compiled import CompiledUNet, resolve_mode  # torch.compile machinery: only when asked

        mode = resolve_mode(mode, self.device)
        self.compiled = None if mode is None else CompiledUNet(self.unet, mode, backend=backend)

    @property
    def attention_tokenizer(self):
        """The tokenizer of the text tokens the network's attention reads (Prompt-to-Prompt's word positions)."""
        return self.tokenizer

    @property
    def guidance_distilled(self) -> bool:
        """True when the UNet takes the guidance embedding (a 512-d time-conditioning projection)."""
        return self.unet.config.time_cond_proj_dim is not None

    # ------------------------------------------------------------------ text
    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise `PromptError` for prompts this model cannot read (words outside a closed vocabulary)."""
        if self.vocabulary is None:
            return
        known = set(self.vocabulary)
        unknown = list(dict.fromkeys(w for p in prompts for w in p.lower().split() if w not in known))
        if unknown:
            raise PromptError(unknown_words_message(unknown, self.vocabulary))

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """Token embeddings of `prompts` (padded to the tokenizer's max length; longer prompts are truncated)."""
        self.check_prompts(prompts)
        ids = self.token_ids(self.tokenizer, prompts)
        return Cond(tokens=self.text_encoder(ids)[0].to(self.dtype))

    def token_ids(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids [B, L] padded to the tokenizer's length; a longer prompt is truncated with a one-line warning."""
        limit = tokenizer.model_max_length
        for p, ids in zip(prompts, tokenizer(list(prompts)).input_ids):
            if len(ids) > limit:
                shown = p if len(p) <= 60 else p[:57] + "..."
                log.warning("prompt truncated to %d tokens (it has %d): %r", limit, len(ids), shown)
        return tokenizer(list(prompts), padding="max_length", max_length=limit, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    # ------------------------------------------------------------------ images
    def preprocess(self, images) -> torch.Tensor:
        """uint8 [N,H,W,3] array / list of PIL images / float tensor in [-1,1] -> float [N,3,S,S] on device."""
        if isinstance(images, torch.Tensor):
            x = images.float()
        else:
            if not isinstance(images, np.ndarray):
                images = np.stack([np.asarray(im.convert("RGB")) for im in images])
            x = torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.size_multiple is None:
            size = (self.image_size, self.image_size)
        else:  # any size the VAE and UNet take: sides rounded down to the family's multiple
            m = self.size_multiple
            size = (max(m, x.shape[-2] // m * m), max(m, x.shape[-1] // m * m))
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False,
                                                antialias=True).clamp(-1, 1)
        return x.to(self.device)

    @torch.no_grad()
    def encode_images(self, images) -> torch.Tensor:
        """Images -> clean latents z0 = (posterior mean - shift factor) x scaling factor (docs/method.md §8.1)."""
        x = self.preprocess(images)
        mean = self.vae_call(lambda vae, v: vae.encode(v).latent_dist.mean, x)
        return (mean - self.shift_factor) * self.scaling_factor if self.shift_factor else mean * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, z0: torch.Tensor) -> torch.Tensor:
        """Clean latents -> images, float [N,3,H,W] in [-1, 1]."""
        shift = self.shift_factor
        return self.vae_call(lambda vae, z: vae.decode(z / self.scaling_factor + shift).sample, z0
                             ).float().clamp(-1, 1)

    def vae_call(self, fn, x: torch.Tensor) -> torch.Tensor:
        """``fn(vae, x)`` in the VAE's dtype; with `vae_upcast` and a half-precision VAE, a batch whose output holds
        NaN / Inf (fp16 overflow: SDXL's VAE) is computed again by an fp32 copy of the VAE (made once, kept)."""
        out = fn(self.vae, x.to(self.vae.dtype))
        if self.vae_upcast and self.vae.dtype != torch.float32 and not bool(torch.isfinite(out).all()):
            state = self._vae_state
            if state.get("vae") is not self.vae:  # the fp32 copy of this VAE (weights upcast exactly)
                state["vae"], state["fp32"] = self.vae, copy.deepcopy(self.vae).to(torch.float32)
            state["upcasts"] += 1
            out = fn(state["fp32"], x.to(torch.float32))
        return out

    @property
    def vae_upcasts(self) -> int:
        """VAE batches re-run in fp32 so far (`vae_call`)."""
        return self._vae_state["upcasts"]

    def empty_cond(self, n: int) -> Cond:
        """The empty prompt's conditioning for `n` rows (encoded once per batch size)."""
        key = (n, str(self.device))
        if key not in self._empty:
            self._empty[key] = self.encode_prompt([""] * n)
        return self._empty[key]

    # ------------------------------------------------------------------ network
    def eps_fn(self, *, adapter: str | None = None, guidance: torch.Tensor | float | None = None,
               tau: float | None = None, uncond: Cond | Callable[[int], Cond] | None = None) -> EpsFn:
        """The network as an `EpsFn` ``(x_t, t, cond) -> eps_hat``.

        adapter: ``None`` (the UNet itself), ``lora.REVERSE`` or ``lora.FORWARD``. guidance: code w = CFG - 1, a
        float or one per row (None: unguided). tau: dynamic-CFG threshold (None: constant guidance). A
        guidance-distilled UNet reads e(w(t)) in one call; any other UNet runs `guided_eps` (two-pass CFG) against
        `uncond` (default: the empty prompt).
        """
        self._check_adapter(adapter)
        if self.guidance_distilled or guidance is None:
            code = None if guidance is None or isinstance(guidance, torch.Tensor) else float(guidance)

            def eps(x, t, cond):
                if not isinstance(t, torch.Tensor) and (guidance is None or code is not None):
                    w = 0.0 if code is None else dynamic_code(int(t), code, tau)  # host arithmetic, no tensors
                else:
                    w = None if guidance is None else dynamic_guidance(t, guidance_codes(guidance, x.shape[0]), tau)
                return self._unet(x, t, cond, adapter=adapter, guidance=w)

            return eps
        plain = self.eps_fn(adapter=adapter)
        if uncond is not None:
            return guided_eps(plain, guidance, tau=tau, uncond=uncond)
        return lambda x, t, cond: guided_eps(plain, guidance, tau=tau, uncond=self.empty_cond(len(cond)))(x, t, cond)

    def unet_kwargs(self, cond: Cond, x_t: torch.Tensor) -> dict:
        """Family-specific UNet inputs for `cond` on latents `x_t` (SDXL: ``added_cond_kwargs``, whose size ids
        follow the latents); none for SD-1.5 layouts."""
        return {}

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in lora.ADAPTERS:
            raise ValueError(f"unknown adapter {adapter!r}; choose from {', '.join(lora.ADAPTERS)} or None")
        if adapter is not None and self.fused is None and not lora.has_adapters(self.unet):
            raise ValueError(f"adapter {adapter!r} requested but this model has no iCD adapters")

    def _activate(self, adapter: str | None) -> None:
        """Point the UNet at `adapter`'s weights for the call that follows (free when the adapters are fused)."""
        if self.fused is not None:
            self.fused.activate(adapter)
        elif lora.has_adapters(self.unet):
            lora.use(self.unet, adapter, trainable=self.trainable_adapters)

    def _unet(self, x_t: torch.Tensor, t: int | torch.Tensor, cond: Cond, *, adapter: str | None,
              guidance: torch.Tensor | float | None) -> torch.Tensor:
        """One UNet evaluation eps_hat(x_t, t, c[, e(w)]) with `adapter` active; `guidance` [B] codes, one code for
        every row (a float: its embedding is built once per device and reused) or None. An integer `t` becomes a
        device tensor once per (t, batch, device) (`_timesteps`): no host-to-device copy per call."""
        n = x_t.shape[0]
        t = self._timesteps(t, n, x_t.device)
        kwargs = self.unet_kwargs(cond, x_t)
        if self.guidance_distilled:
            kwargs["timestep_cond"] = self._guidance_rows(0.0 if guidance is None else guidance, n, x_t.device)
        else:
            self._refuse_guidance(guidance)
        self._activate(adapter)
        self.counter.record(n)
        if self.compiled is not None and not torch.is_grad_enabled():  # gradients (NTI, training): eager
            return self.compiled(x_t.to(self.dtype), t, encoder_hidden_states=cond.tokens, **kwargs).to(x_t.dtype)
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.tokens, **kwargs).sample
        return out.to(x_t.dtype)

    @staticmethod
    def _refuse_guidance(guidance: torch.Tensor | float | None) -> None:
        """ValueError for a non-zero guidance code on a network without a guidance input (two passes instead)."""
        if guidance is not None and (guidance != 0 if isinstance(guidance, float) else bool(torch.any(guidance != 0))):
            raise ValueError("this network (UNet or transformer) is not guidance-distilled; guidance needs two passes "
                             "(icd.models.base.guided_eps)")

    def _timesteps(self, t: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
        """`t` as the UNet's [n] timestep tensor on `device`; integers are cached (at most 1000 per batch size)."""
        if isinstance(t, torch.Tensor):
            t = t.to(device)
            return t.expand(n) if t.ndim == 0 else t
        key = (int(t), n, device)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._cache(key, torch.as_tensor(int(t), device=device).expand(n))
        return cached

    def _guidance_rows(self, w: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
        """The guidance embedding e(w) [n, dim] on `device` in the UNet's dtype: per-row codes computed, one code for
        all rows (a float) built once and cached."""
        dim = self.unet.config.time_cond_proj_dim
        if isinstance(w, torch.Tensor):
            return guidance_embedding(w, dim).to(device, self.dtype)
        key = ("e(w)", float(w), n, device, self.dtype)
        cached = self._device_cache.get(key)
        if cached is None:
            cached = self._cache(key, guidance_embedding(guidance_codes(w, n), dim).to(device, self.dtype))
        return cached

    def _cache(self, key, value: torch.Tensor) -> torch.Tensor:
        """Keep `value` under `key` in the per-device input cache (bounded: a caller sweeping codes cannot grow it
        without limit)."""
        if len(self._device_cache) >= DEVICE_CACHE_MAX:
            self._device_cache.clear()
        self._device_cache[key] = value
        return value


def dynamic_code(t: int, w: float, tau: float | None) -> float:
    """`icd.guidance.dynamic_guidance` for one integer timestep and one code, in host arithmetic with its float32
    rounding: w(t) = 0 where float32(t) / 1000 > float32(tau), else w (float32)."""
    w32 = float(np.float32(w))
    if tau is None:
        return w32
    return 0.0 if np.float32(t) / np.float32(1000.0) > np.float32(tau) else w32


def check_prompts(model: LatentDiffusion, prompts: Sequence[str]) -> None:
    """PromptError for an empty prompt or one `model` cannot read (`LatentDiffusion.check_prompts`)."""
    for p in prompts:
        if not p.strip():
            raise PromptError("a prompt is empty")
    model.check_prompts(prompts)


def unknown_words_message(unknown: Sequence[str], vocabulary: Sequence[str]) -> str:
    """One line naming each unknown word with the closest known words, then the vocabulary."""
    hints, shown = [], 5  # a few words: a 10 000-word prompt must not print a 90 kB line
    more = f" and {len(unknown) - shown} more" if len(unknown) > shown else ""
    for w in unknown[:shown]:
        close = difflib.get_close_matches(w, list(vocabulary), n=3, cutoff=0.5)
        hints.append(f"{w!r} (did you mean {' / '.join(close)}?)" if close else repr(w))
    return f"unknown word(s) for this model: {', '.join(hints)}{more}; known words: {' '.join(vocabulary)}"
