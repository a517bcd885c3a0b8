"""Attention controllers for editing: Prompt-to-Prompt (replace / refine / reweight / local blend) and MasaCtrl
(docs/baselines.md §5-6). A controller is created per edit and holds all of that edit's state; nothing is global.

Batch layout: rows ``0..S-1`` are the source branch, rows ``S..S+T-1`` the targets, and ``source_of[j]`` is the
source row of target j (several target prompts may share one source image). Under two-pass CFG the layout is
repeated for the unconditional half, which controllers leave alone: the attention processor reads the layout from
the batch it sees (`Controller.layout`), since a guided step may run one half or both.

Lifecycle, driven by the sampling loop (never by counting layer calls): ``begin_step(i, t)`` before the UNet call of
reverse step i at timestep t, the attention hooks during it, ``on_latents(x)`` on the latents after the step.

Attention: `Controller.attend(q, k, v, mask, scale, info, tokens)` returns a layer's output. Every control runs as
fused SDPA on mixed rows (`icd.editing.attention`); probabilities are materialised only for P2P's local-blend maps
(at most `BLEND_MAX_TOKENS` queries, no copy) or where a subclass's `needs_probs` asks for them. Row indices live
on the device, built once per batch layout (`Controller.rows`), before the loop (`Controller.prepare`).

Compiled UNets (`icd.models.compiled`): what the hooks read inside a UNet call decides which graph runs, so they read
booleans set once per step in `begin_step` (P2P's ``cross_on`` / ``self_on``, MasaCtrl's ``mutual_on``), never the
step number or timestep, and only index tensors `prepare` built: an edit compiles a handful of graphs, not one per step.

Joint attention (an MM-DiT's): `Controller.attend_joint(q, k, v, mask, info)`, the math `icd.editing.joint_attention`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from icd.editing import joint_attention as joint
from icd.editing import tokens as tok
from icd.editing.attention import LayerInfo, attention_probs, sdpa

# A reweight factor scales a word's attention probabilities (at most 1) before they weight the values. The P2P
# reference sweeps x2..x20 to strengthen a word and uses -5 to weaken one; on the embedded model x100 already changes
# the world edit by 33 grey levels on average against the default x4, x1000 by 53 (saturated), and x1e30 turned the
# latents into NaN/Inf after the whole compute (fp32); in fp16 any product over 65504 overflows.
REWEIGHT_MAX = 100.0
BLEND_MAX_TOKENS = 16 * 16  # local blend reads the largest cross-attention maps with at most 16x16 queries


class Controller:
    """No control: the base class and the plain prompt-swap edit."""

    def __init__(self, source_of: Sequence[int], num_steps: int):
        self.source_of = torch.as_tensor(list(source_of), dtype=torch.long)
        self.num_sources = int(self.source_of.max()) + 1 if len(self.source_of) else 0
        self.num_steps = num_steps
        self.cond_offset = 0  # rows before the controlled block (the unconditional half under CFG); see `layout`
        self.step, self.t = 0, 999
        self._rows: dict = {}  # (batch, device) -> device index tensors (`rows`)
        self._consts: dict = {}  # (device, dtype) -> per-target constants on the device (subclasses)

    @property
    def num_rows(self) -> int:
        """Rows of the controlled block: the sources, then the targets."""
        return self.num_sources + len(self.source_of)

    def layout(self, batch: int) -> None:
        """Read the row layout of a UNet call of `batch` rows: [sources, targets] alone, or after an unconditional
        half of the same size (two-pass CFG)."""
        if batch not in (self.num_rows, 2 * self.num_rows):
            raise ValueError(f"a controlled call has {batch} rows; expected {self.num_rows} or {2 * self.num_rows}")
        self.cond_offset = batch - self.num_rows

    # -- lifecycle
    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Build the device tensors of both layouts a UNet call can have ([sources, targets], and after an
        unconditional half) before the loop, so that the attention hooks only read them (a compiled UNet then creates
        no tensor it must hand back, and fills no cache while it runs)."""
        for batch in (self.num_rows, 2 * self.num_rows):
            self.layout(batch)
            self.prepare_layout(batch, device, dtype)
        self.cond_offset = 0

    def prepare_layout(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        """The tensors of the current layout (`prepare`): the row indices; subclasses add their constants."""
        self.rows(batch, device)

    def begin_step(self, i: int, t: int) -> None:
        self.step, self.t = i, int(t)

    def on_latents(self, x: torch.Tensor) -> torch.Tensor:
        return x

    # -- attention hooks
    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask: torch.Tensor | None,
               scale: float, info: LayerInfo, tokens: int) -> torch.Tensor:
        """The output [B, heads, N, d] of one attention layer ([B, heads, N | K, d] inputs, `mask` added to the
        scores). Default: mutual self-attention where asked (keys and values from the source rows), the
        probabilities through `attention` where `needs_probs` asks, else one fused SDPA call."""
        if not info.is_cross and self.mutual_self_attention(info, tokens):
            key, value = self.share_source(key), self.share_source(value)
        if self.needs_probs(info, tokens):
            probs = self.attention(attention_probs(query, key, mask, scale), info, tokens)
            return probs.to(value.dtype) @ value
        return sdpa(query, key, value, mask=mask, scale=scale)

    def attend_joint(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask, info) -> torch.Tensor:
        """One joint attention layer's output from its RoPE-applied q, k, v [B, heads, L + N, d] over [text; image]:
        mutual attention where `mutual_self_attention` asks (`icd.editing.joint_attention`), else fused SDPA."""
        if not self.mutual_self_attention(info, query.shape[2] - info.text_length):
            return sdpa(query, key, value, mask=mask, scale=None)
        return joint.mutual_attention(query, key, value, mask=mask, text=info.text_length,
                                      shared=self.rows(query.shape[0], query.device)["shared"])

    def needs_probs(self, info: LayerInfo, tokens: int) -> bool:
        return False

    def attention(self, probs: torch.Tensor, info: LayerInfo, tokens: int) -> torch.Tensor:
        return probs

    def mutual_self_attention(self, info: LayerInfo, tokens: int) -> bool:
        return False

    # -- helpers
    @property
    def target_rows(self) -> torch.Tensor:
        return self.cond_offset + self.num_sources + torch.arange(len(self.source_of))

    @property
    def source_rows(self) -> torch.Tensor:
        return self.cond_offset + self.source_of

    def shared_rows(self, batch: int) -> torch.Tensor:
        """[batch] row permutation: every target row reads its source row (the conditional half only)."""
        perm = torch.arange(batch)
        perm[self.target_rows] = self.source_rows
        return perm

    def rows(self, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Index tensors of the current layout on `device`, built once per (batch, device): ``src`` / ``tgt`` (the
        conditional half's source row of each target and the target rows) and ``shared`` (`shared_rows`)."""
        key = (batch, self.cond_offset, device)
        if key not in self._rows:
            self._rows[key] = {"src": self.source_rows.to(device), "tgt": self.target_rows.to(device),
                               "shared": self.shared_rows(batch).to(device)}
        return self._rows[key]

    def share_source(self, x: torch.Tensor) -> torch.Tensor:
        """x with every target row replaced by its source row ([B, ...] tensors; a gather, no copy-then-write)."""
        return x.index_select(0, self.rows(x.shape[0], x.device)["shared"])


@dataclass(frozen=True)
class P2PControls:
    """Prompt-to-Prompt settings (defaults: the official iCD SD1.5 launch, docs/method.md §8.2).

    cross_replace / self_replace are fractions of the reverse steps: cross control on steps i < floor(f (N+1)),
    self injection on steps i < floor(f N) and only in layers with at most `max_self_tokens` queries (None: a
    quarter of the latent's pixels, i.e. 32x32 at SD's 64x64 latents). reweight maps words to factors in
    -REWEIGHT_MAX..REWEIGHT_MAX (negative: less attention); with `reweight_new_words` the target's new words
    (tokens.changed_words) get that factor. blend_words are (source words, target words) for local blend, shared by
    all targets, or a list with one such pair per target; `mask` is a user mask [H, W] in [0, 1] (latent or image size).
    blocks: a transformer's controlled joint-attention blocks (`icd.editing.joint_attention.check_blocks`; UNets: None).
    """

    cross_replace: float = 0.3
    self_replace: float = 0.6
    max_self_tokens: int | None = None
    mode: str = "auto"  # auto | replace | refine
    reweight: dict[str, float] = field(default_factory=dict)
    reweight_new_words: float | None = 4.0
    blend_words: tuple | list | None = None  # (source words, target words), or a list of them per target
    blend_threshold: float = 0.3
    mask: torch.Tensor | None = None
    blocks: str | tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "blocks", joint.check_blocks(self.blocks))
        for name in ("cross_replace", "self_replace"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.mode not in ("auto", "replace", "refine"):
            raise ValueError(f"P2P mode must be auto, replace or refine, got {self.mode!r}")
        bad = {w: f for w, f in self.reweight.items() if not math.isfinite(f)}
        if bad or (self.reweight_new_words is not None and not math.isfinite(self.reweight_new_words)):
            raise ValueError(f"reweight factors (--reweight) must be finite numbers, got "
                             f"{bad or self.reweight_new_words}")
        bad = {w: f for w, f in self.reweight.items() if abs(f) > REWEIGHT_MAX}
        if bad or (self.reweight_new_words is not None and abs(self.reweight_new_words) > REWEIGHT_MAX):
            raise ValueError(f"reweight factors (--reweight) must lie in -{REWEIGHT_MAX:g}..{REWEIGHT_MAX:g}, got "
                             f"{', '.join(f'{w}={f:g}' for w, f in bad.items()) or self.reweight_new_words}")
        if not 0.0 < self.blend_threshold < 1.0:  # 0 blends everywhere, 1 nowhere: neither is a local blend
            raise ValueError(f"blend_threshold (--blend-threshold) must lie in (0, 1), got {self.blend_threshold}")


class PromptToPrompt(Controller):
    """Replace or refine cross-attention, inject self-attention, reweight words, blend locally."""

    def __init__(self, tokenizer, source_prompts: Sequence[str], target_prompts: Sequence[str],
                 source_of: Sequence[int], *, num_steps: int, controls: P2PControls,
                 latent_shape: tuple[int, int]):
        super().__init__(source_of, num_steps)
        self.c = controls
        self.latent_shape = tuple(int(v) for v in latent_shape)  # (h, w) of the latents: maps are read at this aspect
        k = tokenizer.model_max_length
        mappers, keep, weights, self.modes = [], [], [], []
        for j, target in enumerate(target_prompts):
            source = source_prompts[int(self.source_of[j])]
            mode = controls.mode
            if mode == "auto":
                mode = "replace" if tok.is_word_swap(source, target) else "refine"
            elif mode == "replace" and not tok.is_word_swap(source, target):
                raise tok.AlignmentError(f"word replace needs the same number of words: {source!r} -> {target!r}")
            self.modes.append(mode)
            if mode == "replace":
                mappers.append(tok.replace_mapper(tokenizer, source, target))
                keep.append(torch.zeros(k))
            else:
                index, alpha = tok.refine_alignment(tokenizer, source, target)
                m = torch.zeros(k, k)
                m[index, torch.arange(k)] = alpha
                mappers.append(m)
                keep.append(1.0 - alpha)
            e = torch.ones(k)
            spans = tok.word_spans(tokenizer, target)
            factors = dict(controls.reweight)
            if controls.reweight_new_words is not None:
                factors = {w: controls.reweight_new_words for w in tok.changed_words(source, target)} | factors
            for word, factor in factors.items():
                hits = [span for w, span in zip(tok.words(target), spans) if w == word.lower()]
                if not hits and word in controls.reweight:
                    raise tok.AlignmentError(f"reweight word {word!r} is not in the target prompt {target!r}")
                for span in hits:
                    e[list(span)] = factor
            weights.append(e)
        self.mappers, self.keep, self.equalizer = torch.stack(mappers), torch.stack(keep), torch.stack(weights)
        self.blend = None
        if controls.blend_words is not None:
            self.blend = _blend_positions(tokenizer, source_prompts, target_prompts, self.source_of,
                                          blend_words=controls.blend_words, k=k)
        self.maps: dict[int, torch.Tensor] = {}  # tokens -> summed cross maps [rows, tokens, K] for local blend
        self.cross_steps = math.floor(controls.cross_replace * (num_steps + 1))
        self.self_steps = math.floor(controls.self_replace * num_steps)
        self.max_self_tokens = controls.max_self_tokens or (self.latent_shape[0] * self.latent_shape[1]) // 4
        self.begin_step(0, self.t)

    def begin_step(self, i: int, t: int) -> None:
        super().begin_step(i, t)
        self.cross_on, self.self_on = i < self.cross_steps, i < self.self_steps  # what the hooks read

    def prepare_layout(self, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        super().prepare_layout(batch, device, dtype)
        self.constants(batch, torch.empty(0, device=device, dtype=dtype))

    def cross_control(self, info: LayerInfo, tokens: int) -> bool:
        """This cross-attention layer mixes the target's map with its source's at this step."""
        return info.is_cross and self.cross_on

    def self_injection(self, info: LayerInfo, tokens: int) -> bool:
        """This self-attention layer gives the targets their sources' maps at this step."""
        return not info.is_cross and self.self_on and tokens <= self.max_self_tokens

    def needs_probs(self, info: LayerInfo, tokens: int) -> bool:
        """Only local blend reads maps: cross-attention layers with at most `BLEND_MAX_TOKENS` queries."""
        return info.is_cross and self.blend is not None and tokens <= BLEND_MAX_TOKENS

    def attend(self, query, key, value, *, mask, scale, info, tokens):
        if self.needs_probs(info, tokens):
            probs = self.attention(attention_probs(query, key, mask, scale), info, tokens)
            return probs.to(value.dtype) @ value
        if self.self_injection(info, tokens):  # P_src on V_tgt: the targets' queries and keys are their sources'
            shared = self.rows(query.shape[0], query.device)["shared"]
            query, key = query.index_select(0, shared), key.index_select(0, shared)
            if mask is not None and mask.shape[0] > 1:
                mask = mask.index_select(0, shared)
            return sdpa(query, key, value, mask=mask, scale=scale)
        if self.cross_control(info, tokens):
            return self._mixed_cross(query, key, value, mask=mask, scale=scale)
        return sdpa(query, key, value, mask=mask, scale=scale)

    def joint_control(self, info) -> tuple[bool, bool, bool]:
        """(image->text control, image->image injection, blend maps) in this joint block at this step."""
        chosen = joint.chosen(info, self.c.blocks)
        return self.cross_on and chosen, self.self_on and chosen, self.blend is not None and chosen

    def attend_joint(self, query, key, value, *, mask, info):
        """Target rows' image queries attend with the mixed joint map (`icd.editing.joint_attention.prompt_to_prompt`);
        local blend records the controlled rows' image->text maps."""
        text, k = info.text_length, self.mappers.shape[-1]
        cross, inject, blend = self.joint_control(info)
        if not (cross or inject or blend):
            return sdpa(query, key, value, mask=mask, scale=None)
        if text > k:
            raise ValueError(f"the joint attention has {text} text tokens; the prompts were aligned on {k}")
        batch = query.shape[0]
        out, maps = joint.prompt_to_prompt(
            query, key, value, mask=mask, text=text, rows=self.rows(batch, query.device),
            block=slice(self.cond_offset, self.cond_offset + self.num_rows), inject=inject,
            constants=self.constants(batch, query) if cross else None)
        if blend:  # [rows, N, K] summed over layers and steps, as a UNet's maps
            tokens = query.shape[2] - text
            self.maps[tokens] = self.maps.get(tokens, 0) + F.pad(maps.mean(dim=1).detach().float(), (0, k - text))
        return out

    def constants(self, batch: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-target mixing constants on `like`'s device and dtype, built once per layout: ``mappers``
        [T, K, K], ``keep`` and ``equalizer`` [T, 1, 1, K] (probability columns), ``mixed`` [T, 1, K, K] = M diag(e)
        and ``value_scale`` [batch, 1, K, 1] (keep * e on the target rows, 1 elsewhere)."""
        key = (batch, self.cond_offset, like.device, like.dtype)
        if key not in self._consts:
            k = self.mappers.shape[-1]
            value_scale = torch.ones(batch, 1, k, 1)
            value_scale[self.target_rows] = (self.keep * self.equalizer)[:, None, :, None]
            self._consts[key] = {name: v.to(like.device, like.dtype) for name, v in {
                "mappers": self.mappers, "keep": self.keep[:, None, None, :],
                "equalizer": self.equalizer[:, None, None, :],
                "mixed": (self.mappers * self.equalizer[:, None, :])[:, None], "value_scale": value_scale}.items()}
        return self._consts[key]

    def _mixed_cross(self, query, key, value, *, mask, scale):
        """Word replace / refine / reweight without the map: the target's output
        ``((P_src M + P_tgt diag(keep)) diag(e)) V_tgt = P_src (M diag(e) V_tgt) + P_tgt (diag(keep e) V_tgt)``."""
        batch = query.shape[0]
        r, c = self.rows(batch, query.device), self.constants(batch, value)
        src, tgt = r["src"], r["tgt"]
        out = sdpa(query, key, value * c["value_scale"], mask=mask, scale=scale)
        mapped = c["mixed"] @ value.index_select(0, tgt)  # [T, heads, K, d]: M diag(e) V_tgt
        if mask is not None and mask.shape[0] > 1:
            mask = mask.index_select(0, src)
        extra = sdpa(query.index_select(0, src), key.index_select(0, src), mapped, mask=mask, scale=scale)
        return out.index_add(0, tgt, extra) if torch.is_grad_enabled() else out.index_add_(0, tgt, extra)

    def attention(self, probs: torch.Tensor, info: LayerInfo, tokens: int) -> torch.Tensor:
        """A local-blend layer's maps: the targets' mixed maps written into `probs` (no copy without autograd), then
        the controlled rows' maps summed over heads into `maps`."""
        if self.cross_control(info, tokens):
            r, c = self.rows(probs.shape[0], probs.device), self.constants(probs.shape[0], probs)
            mapped = torch.einsum("thqk,tkj->thqj", probs.index_select(0, r["src"]), c["mappers"])
            new = (mapped + probs.index_select(0, r["tgt"]) * c["keep"]) * c["equalizer"]
            probs = probs.index_copy(0, r["tgt"], new) if torch.is_grad_enabled() else \
                probs.index_copy_(0, r["tgt"], new)
        rows = probs[self.cond_offset:self.cond_offset + self.num_rows]
        self.maps[tokens] = self.maps.get(tokens, 0) + rows.mean(dim=1).detach().float()
        return probs

    def on_latents(self, x: torch.Tensor) -> torch.Tensor:
        for tokens in self.maps:  # out of the UNet call's memory (a CUDA-graph replay reuses it), same dict
            self.maps[tokens] = self.maps[tokens].clone()
        mask = self.blend_mask(tuple(x.shape[-2:]))
        if mask is None:
            return x
        key = ("latents", x.device)  # the latents' rows: [sources, targets], no unconditional half
        if key not in self._rows:
            self._rows[key] = (self.source_of.to(x.device),
                               (self.num_sources + torch.arange(len(self.source_of))).to(x.device))
        src_rows, tgt_rows = self._rows[key]
        src, tgt = x.index_select(0, src_rows), x.index_select(0, tgt_rows)
        return x.index_copy(0, tgt_rows, src + mask.to(x) * (tgt - src))

    def blend_mask(self, size: tuple[int, int]) -> torch.Tensor | None:
        """[T, 1, h, w] mask where the target may differ from its source (None: no local blend)."""
        if self.c.mask is not None:
            m = torch.as_tensor(self.c.mask, dtype=torch.float32)
            m = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0]
            return m.expand(len(self.source_of), 1, *size)
        if self.blend is None or not self.maps:
            return None
        tokens = max(self.maps)
        h, w = map_shape(tokens, size)
        maps = self.maps[tokens].reshape(-1, h, w, self.maps[tokens].shape[-1])  # [rows, h, w, K]
        src_w, tgt_w = self.blend
        tgt_rows = self.num_sources + torch.arange(len(self.source_of))
        word_src = (maps[self.source_of] * src_w[:, None, None, :]).sum(-1)
        word_tgt = (maps[tgt_rows] * tgt_w[:, None, None, :]).sum(-1)
        out = []
        for m in (word_src, word_tgt):
            m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)
            m = m / m.amax(dim=(2, 3), keepdim=True).clamp(min=1e-8)
            out.append(m > self.c.blend_threshold)
        return (out[0] | out[1]).float()


def map_shape(tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of an attention level with `tokens` queries on latents of shape `latent` (the UNet halves both sides
    per level, rounding up)."""
    h, w = latent
    while h * w > tokens:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} attention queries match no level of a {latent[0]}x{latent[1]} latent")
    return h, w


def _blend_positions(tokenizer, source_prompts, target_prompts, source_of, *, blend_words, k):
    """[T, K] indicator vectors of the source and target blend words' token positions."""
    per_target = blend_words if isinstance(blend_words, list) else [blend_words] * len(source_of)
    if len(per_target) != len(source_of):
        raise tok.AlignmentError(f"{len(per_target)} blend-word pairs for {len(source_of)} target prompts")
    src_v, tgt_v = torch.zeros(len(source_of), k), torch.zeros(len(source_of), k)
    for j in range(len(source_of)):
        src_words, tgt_words = (tuple(w.lower() for w in ws) for ws in per_target[j])
        for prompt, chosen, vec in ((source_prompts[int(source_of[j])], src_words, src_v),
                                    (target_prompts[j], tgt_words, tgt_v)):
            found = set()
            for w, span in zip(tok.words(prompt), tok.word_spans(tokenizer, prompt)):
                if w in chosen:
                    vec[j, list(span)] = 1.0
                    found.add(w)
            missing = [w for w in chosen if w not in found]
            if missing:
                raise tok.AlignmentError(f"blend word(s) {', '.join(missing)} not in the prompt {prompt!r}")
    return src_v, tgt_v


@dataclass(frozen=True)
class MasaCtrlControls:
    """MasaCtrl settings: mutual self-attention at timesteps t <= start_t (default 920, i.e. step 4 of 50) and in
    transformer blocks with index >= start_layer (None: the decoder's first block, as L = 10 of 16 in SD1.x; on FLUX:
    `icd.editing.joint_attention.JointAttentionLayers.mutual_start`, blocks counted double-stream first)."""

    start_t: int = 920
    start_layer: int | None = None

    def __post_init__(self):
        if isinstance(self.start_t, bool) or not isinstance(self.start_t, int) or not 0 <= self.start_t <= 1000:
            raise ValueError(f"start_t (--masactrl-start-t) must be an integer timestep in 0..1000, got {self.start_t}")
        if self.start_layer is not None and (isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int)
                                             or self.start_layer < 0):
            raise ValueError(f"start_layer (--masactrl-layer) must be a block index >= 0, got {self.start_layer}")


class MasaCtrl(Controller):
    """Targets keep their queries and read keys/values from their source rows in the chosen self-attention layers."""

    def __init__(self, source_of: Sequence[int], num_steps: int, controls: MasaCtrlControls, *,
                 first_decoder_layer: int):
        super().__init__(source_of, num_steps)
        self.c = controls
        self.start_layer = first_decoder_layer if controls.start_layer is None else controls.start_layer
        self.begin_step(0, self.t)

    def begin_step(self, i: int, t: int) -> None:
        super().begin_step(i, t)
        self.mutual_on = self.t <= self.c.start_t  # what the hook reads

    def mutual_self_attention(self, info: LayerInfo, tokens: int) -> bool:
        return self.mutual_on and info.index >= self.start_layer

    def shared_rows(self, batch: int) -> torch.Tensor:
        """Within each half of the batch (both halves under two-pass CFG), targets read their sources' rows."""
        perm = torch.arange(batch)
        targets = self.num_sources + torch.arange(len(self.source_of))
        for offset in sorted({0, self.cond_offset}):
            perm[offset + targets] = offset + self.source_of
        return perm
