"""Attention control on the joint attention of an MM-DiT (FLUX), as diffusers attention processors (docs/flow.md,
"Attention control on joint attention"). No monkey-patching and no module-level state: `JointAttentionLayers.install`
sets a `JointAttnProcessor` on every `FluxAttention` through its own ``set_processor`` and `restore` puts the
previous processors back (`icd.editing.attention.controlled` does both around an edit, also on an exception).

**The layers.** FLUX runs D double-stream blocks (``transformer_blocks``: image and text tokens keep separate
projections, ``to_q/k/v`` and ``add_q/k/v_proj``, and attend jointly over the sequence [text; image]) and then S
single-stream blocks (``single_transformer_blocks``: one projection of the concatenated [text; image] sequence).
Every attention is one softmax over the L + N keys of the joint sequence (L text tokens, N = h w / 4 packed image
tokens). `JointLayerInfo` records the stream, the block's index within its stream, its ``index`` in the
transformer's order (double 0..D-1, then single D..D+S-1: Stable Flow's numbering of FLUX.1's 57 layers, and what
`MasaCtrlControls.start_layer` counts for a transformer) and, per call, the text length L.

**The processor.** `JointAttnProcessor` computes what diffusers' `FluxAttnProcessor` computes (projections, QK RMS
norms, [text; image] concatenation, RoPE); without a controller it calls the same attention function, so the
transformer's output is the default processors' (tested within 1e-5). With one it hands the RoPE-applied queries,
keys and values [B, heads, L + N, d] of the joint sequence to ``controller.attend_joint`` (`icd.editing.controllers`)
and splits its output back as diffusers does. The double-stream processors read L from their text input; the
single-stream ones from the transformer call (a forward pre-hook that `install` registers and `restore` removes, which
reads ``encoder_hidden_states``).

**The controls** (`icd.editing.controllers`; batch rows [sources..., targets...], target j reads its source row
``source_of[j]``; only target rows of the conditional half change, and only their image queries: the text queries
always keep the target's own attention):

- *MasaCtrl-style mutual attention* (`Controller.attend_joint` -> `mutual_attention`, in blocks with
  ``index >= start_layer`` at t <= start_t; default start `JointAttentionLayers.mutual_start`): a target row's image
  queries attend over [its own text keys; its source's image keys] with [its own text values; its source's image
  values] (Stable Flow's injection of the reference image's keys and values, applied as MasaCtrl schedules it).
- *Prompt-to-Prompt* (`PromptToPrompt.attend_joint` -> `prompt_to_prompt`, in the blocks `P2PControls.blocks`
  chooses, `check_blocks`; default `DEFAULT_P2P_BLOCKS`). For an image query i of target row j, with P the joint
  softmax over [text; image] keys and P^txt its image->text block [N, L]:

      T      = P_src^txt M + P_tgt^txt diag(keep)            (the cross window; else T = P_tgt^txt)
      m      = sum_l T_il                                     (T's text mass, clamped to [0, 1])
      mixed  = [ T diag(e) ,  (1 - m) * softmax_image(q_i K_img^T / sqrt(d)) ]

  M, keep and e are `PromptToPrompt`'s word alignment (replace: keep = 0; refine: new tokens keep their own maps)
  and reweighting, exactly as on a UNet's cross-attention; ``softmax_image`` is the softmax over the N image keys
  alone, of the target's own queries and keys, or of its source's during the self-replace window (self-attention
  injection). The output is ``T diag(e) V_tgt^txt + (1 - m) softmax_image(...) V_tgt^img``.

  *Normalisation, and why.* Before reweighting the mixed row sums to 1, as every row of a joint softmax does: the
  target image token reads the text with the source's aligned image->text probabilities in absolute terms (how much
  each image token attends to the text at all is part of the source's layout), and the image keys share the remaining
  1 - m in the proportions the target's own image->image attention (or, injected, the source's) gives them. With
  identical prompts M = I and keep = 0 give T = P_src^txt, m = the source's text mass, and the row is the source's own
  row: the target decodes as the source. The two alternatives are worse: splicing the two blocks unrenormalised leaves
  rows summing to 1 + m_src - m_tgt (the output's scale then follows the prompts' difference); rescaling T to the
  target's own text mass discards the source's per-pixel text mass. Reweighting multiplies T's columns by e after the
  normalisation and is not renormalised, as P2P's equalizer scales probabilities after the softmax on a UNet.
- *Local blend* reads the mixed image->text maps T diag(e) (sources: their own P^txt) of the blend words, averaged
  over heads and summed over the controlled blocks and steps: an h/2 x w/2 token map per row (8 x 8 on the embedded
  model's 16 x 16 latents), upsampled bilinearly to the latent's size and thresholded as on a UNet
  (`PromptToPrompt.blend_mask`).

**Cost.** Nothing materialises the joint (L + N)^2 map: the image->image part is fused SDPA over the image keys, the
text mass m comes from one fused SDPA with a 0/1 indicator of the text keys as the value, and only the image->text
block [N, L] is materialised (for the controlled rows' image queries). On the embedded model that block is 64 x 20
per head (the joint map would be 84 x 84). At FLUX.1's 1024^2 (N = 4096, L = 512, 24 heads) the block is
4096 x 512 x 24 = 50 M entries per row, 201 MB in float32 (101 MB in bfloat16) per controlled layer call, freed after
the layer; the full joint map would be 4608^2 x 24 = 510 M entries, 2.04 GB per row in float32 (1.02 GB in bfloat16)
per layer call, with the source and target rows of an edit both needed at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn  # what FluxAttnProcessor calls
from diffusers.models.embeddings import apply_rotary_emb

STREAMS = ("double", "single")
BLOCK_CHOICES = ("all", "double", "single")
# The blocks P2P controls on a transformer when `P2PControls.blocks` is None: measured on held-out world edits with
# the embedded flow model (docs/flow.md §6: "all" beats single-stream only narrowly and double-stream only clearly).
DEFAULT_P2P_BLOCKS = "all"


@dataclass(frozen=True)
class JointLayerInfo:
    """One joint-attention layer of an MM-DiT: its processor name, stream (double | single), block index within the
    stream, ``index`` in the transformer's block order (double-stream blocks first), and the text length L of the
    current call (None in `JointAttentionLayers.infos`; set on the record a processor hands its controller)."""

    name: str
    stream: str  # double | single
    block: int  # index within its stream
    index: int  # transformer order: double 0..D-1, then single D..D+S-1 (MasaCtrl's start_layer counts these)
    text_length: int | None = None


def check_blocks(blocks):
    """`P2PControls.blocks`: None (`DEFAULT_P2P_BLOCKS`), "all", "double" (double-stream only), "single"
    (single-stream only) or block indices in the transformer's order (`JointLayerInfo.index`), made a tuple."""
    if blocks is None or blocks in BLOCK_CHOICES:
        return blocks
    indices = None if isinstance(blocks, str) else tuple(blocks) if hasattr(blocks, "__iter__") else None
    if not indices or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in indices):
        raise ValueError(f"P2P blocks must be one of {', '.join(BLOCK_CHOICES)} or block indices >= 0, got {blocks!r}")
    return indices


def chosen(info: JointLayerInfo, blocks) -> bool:
    """This layer's block is one of `blocks` (`check_blocks`'s values)."""
    blocks = DEFAULT_P2P_BLOCKS if blocks is None else blocks
    if blocks == "all":
        return True
    return info.stream == blocks if isinstance(blocks, str) else info.index in blocks


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fused attention on [B, heads, N, d] tensors at the default scale 1/sqrt(d), no mask (as FluxAttnProcessor)."""
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)


def _no_mask(mask: torch.Tensor | None) -> None:
    if mask is not None:
        raise ValueError("attention control on joint attention takes no attention mask (FluxTransformer2DModel "
                         "passes none)")


def joint_text_maps(query: torch.Tensor, key: torch.Tensor, text: int) -> torch.Tensor:
    """[b, heads, Q, L]: the joint softmax's probabilities of `query`'s rows [b, heads, Q, d] on the first `text` of
    `key`'s L + N keys (scale 1/sqrt(d)), without the Q x (L + N) map: the softmax over the text keys alone times the
    text's share of the joint softmax, which is one fused SDPA with a 0/1 text indicator as the value."""
    scores = (query @ key[:, :, :text].transpose(-1, -2)) * query.shape[-1] ** -0.5
    indicator = key.new_zeros(1, 1, key.shape[2], 1)
    indicator[:, :, :text] = 1.0
    mass = sdpa(query, key, indicator.expand(key.shape[0], key.shape[1], -1, -1))
    return scores.softmax(dim=-1) * mass


def mutual_attention(query, key, value, *, mask, text: int, shared: torch.Tensor) -> torch.Tensor:
    """MasaCtrl on [B, heads, L + N, d]: each row's image queries attend over [its own text keys; row shared[b]'s
    image keys] with the matching values (targets read their sources; other rows themselves); text queries keep the
    row's own attention."""
    _no_mask(mask)
    key_img = torch.cat([key[:, :, :text], key.index_select(0, shared)[:, :, text:]], dim=2)
    value_img = torch.cat([value[:, :, :text], value.index_select(0, shared)[:, :, text:]], dim=2)
    return torch.cat([sdpa(query[:, :, :text], key, value),
                      sdpa(query[:, :, text:], key_img, value_img)], dim=2)


def prompt_to_prompt(query, key, value, *, mask, text: int, rows: dict, block: slice, constants: dict | None,
                     inject: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, heads, L + N, d], image->text maps [rows, heads, N, L] of the controlled block's rows) with the
    target rows' image queries on the mixed joint map (module docstring). `rows`: `Controller.rows` (``src`` /
    ``tgt``: the block's source row of each target and the target rows); `block`: the controlled rows; `constants`:
    `PromptToPrompt.constants` (``mappers`` M, ``keep``, ``equalizer`` e) in the cross window, else None; `inject`:
    the image->image softmax of the sources' queries and keys (self window). The maps are the targets' mixed ones
    (T diag(e)) in the cross window, everyone's own otherwise."""
    _no_mask(mask)
    src, tgt = rows["src"], rows["tgt"]
    out = sdpa(query, key, value)
    q_img = query[:, :, text:]
    maps = joint_text_maps(q_img[block], key[block], text)
    tgt_in = tgt - block.start
    own = maps.index_select(0, tgt_in)
    if constants is not None:
        mixed = maps.index_select(0, src - block.start) @ constants["mappers"][:, None, :text, :text] + \
            own * constants["keep"][..., :text]
        mass = mixed.sum(-1, keepdim=True).clamp(0.0, 1.0)
        mixed = mixed * constants["equalizer"][..., :text]
        maps = maps.index_copy(0, tgt_in, mixed)
    else:
        mixed, mass = own, own.sum(-1, keepdim=True)
    if constants is not None or inject:
        qk = src if inject else tgt
        v_tgt = value.index_select(0, tgt)
        image = sdpa(q_img.index_select(0, qk), key.index_select(0, qk)[:, :, text:], v_tgt[:, :, text:])
        if torch.is_grad_enabled():
            out = out.clone()
        out[tgt, :, text:] = (mixed.to(v_tgt.dtype) @ v_tgt[:, :, :text] + (1.0 - mass).to(v_tgt.dtype) * image
                              ).to(out.dtype)
    return out, maps


class _TextLength:
    """The text length of the transformer call in progress, read by a forward pre-hook (per install, not global)."""

    def __init__(self):
        self.value: int | None = None

    def read(self, module, args, kwargs):
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.value = None if text is None else int(text.shape[1])


def _projections(attn, hidden_states, encoder_hidden_states):
    """q, k, v (and the text stream's, or None) as diffusers' Flux projections compute them (fused or not)."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        extra = (None, None, None)
        if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
            extra = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return (query, key, value, *extra)
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    extra = (None, None, None)
    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        extra = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                 attn.add_v_proj(encoder_hidden_states))
    return (query, key, value, *extra)


class JointAttnProcessor:
    """diffusers' `FluxAttnProcessor` with the attention itself handed to a controller (module docstring); with
    ``controller=None`` it is that processor."""

    _attention_backend = None  # diffusers' attention-backend hooks set these, as on its own processors
    _parallel_config = None

    def __init__(self, controller, info: JointLayerInfo, text_length: _TextLength | None = None):
        self.controller, self.info, self._text = controller, info, text_length
        self._infos: dict[int, JointLayerInfo] = {}  # text length -> the record handed to the controller

    def layer_info(self, text_length: int) -> JointLayerInfo:
        info = self._infos.get(text_length)
        if info is None:
            info = self._infos[text_length] = replace(self.info, text_length=text_length)
        return info

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        query, key, value, e_query, e_key, e_value = _projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:  # double stream: [text; image] after the text's own norms
            e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
            e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
            e_value = e_value.unflatten(-1, (-1, attn.head_dim))
            query, key = torch.cat([e_query, query], dim=1), torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if self.controller is None:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        else:
            text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else \
                (self._text.value if self._text is not None else None)
            if text is None:
                raise RuntimeError(f"{self.info.name}: the text length of this call is unknown (a single-stream "
                                   "block called outside the transformer's forward)")
            self.controller.layout(query.shape[0])
            out = self.controller.attend_joint(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                               mask=attention_mask, info=self.layer_info(text)).transpose(1, 2)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text = encoder_hidden_states.shape[1]
            e_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(e_out.contiguous())
        return out


class SD3JointAttnProcessor(JointAttnProcessor):
    """diffusers' `JointAttnProcessor2_0` (SD3 / SD3.5's `JointTransformerBlock.attn`: separate image and text
    projections, optional QK norms, no RoPE) with the attention handed to a controller; with ``controller=None`` it
    computes that processor's output. diffusers attends over [image; text]; this processor orders the joint sequence
    [text; image] as FLUX's (the controllers' layout; a softmax over the same keys, so the same attention), and
    splits it back. A ``context_pre_only`` block (SD3's last) drops the text output's projection, as diffusers does."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        def heads(x, norm=None):  # [B, N, heads * d] -> [B, N, heads, d], normed over d as diffusers does
            x = x.unflatten(-1, (attn.heads, -1))
            return x if norm is None else norm(x)

        query, key = heads(attn.to_q(hidden_states), attn.norm_q), heads(attn.to_k(hidden_states), attn.norm_k)
        value, text = heads(attn.to_v(hidden_states)), 0
        if encoder_hidden_states is not None:  # the joint sequence [text; image]
            text = encoder_hidden_states.shape[1]
            query = torch.cat([heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q), query], dim=1)
            key = torch.cat([heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.controller is None or encoder_hidden_states is None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        else:
            self.controller.layout(query.shape[0])
            out = self.controller.attend_joint(query, key, value, mask=attention_mask, info=self.layer_info(text))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        e_out, out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        if encoder_hidden_states is None:
            return out
        return out, e_out if attn.context_pre_only else attn.to_add_out(e_out.contiguous())


SD3_P2P = ("Prompt-to-Prompt is not supported on SD3's joint attention (its text is [CLIP; T5] tokens, which no one "
           "tokenizer aligns); use MasaCtrl (--masactrl) or swap")


@dataclass
class Installed:
    """What `JointAttentionLayers.install` replaced: the previous processors and the text-length hook."""

    processors: dict
    hook: torch.utils.hooks.RemovableHandle


class JointAttentionLayers:
    """The joint attention modules of one FLUX or SD3 transformer with their `JointLayerInfo` (same interface as
    `icd.editing.attention.AttentionLayers`: ``infos``, ``modules``, ``install``, ``restore``). SD3's
    `JointTransformerBlock`s are all double-stream; SD3.5-medium's image-only second attention (``attn2``) keeps its
    own processor. ``p2p_refused``: why Prompt-to-Prompt cannot run here (SD3), else None."""

    joint = True

    def __init__(self, transformer):
        self.transformer = transformer
        self.infos: dict[str, JointLayerInfo] = {}
        self.modules: dict = {}
        sd3 = not hasattr(transformer, "single_transformer_blocks")
        self.processor, self.p2p_refused = (SD3JointAttnProcessor, SD3_P2P) if sd3 else (JointAttnProcessor, None)
        index = 0
        for stream, attr in zip(STREAMS, ("transformer_blocks", "single_transformer_blocks")):
            for b, block in enumerate(getattr(transformer, attr, ())):
                name = f"{attr}.{b}.attn.processor"
                self.infos[name] = JointLayerInfo(name, stream, b, index)
                self.modules[name] = block.attn
                index += 1
        others = set(transformer.attn_processors) - set(self.modules)
        if not set(self.modules) <= set(transformer.attn_processors) or any(".attn2." not in n for n in others):
            raise RuntimeError("attention modules and processor names of this transformer disagree")

    @property
    def num_double(self) -> int:
        return sum(i.stream == "double" for i in self.infos.values())

    @property
    def mutual_start(self) -> int:
        """MasaCtrl's default first block: the first of the second half of the single-stream blocks, D + floor(S/2)
        (4 of the embedded model's 2 + 4, 38 of FLUX.1's 19 + 38; measured on the embedded model: docs/flow.md §6);
        without single-stream blocks (SD3) the first of the second half of the blocks, floor(D / 2)."""
        single = len(self.infos) - self.num_double
        return self.num_double + single // 2 if single else self.num_double // 2

    def install(self, controller) -> Installed:
        """Route every joint attention through `controller`; returns what `restore` puts back."""
        text = _TextLength()
        saved = {name: m.processor for name, m in self.modules.items()}
        hook = self.transformer.register_forward_pre_hook(text.read, with_kwargs=True)
        for name, m in self.modules.items():
            m.set_processor(self.processor(controller, self.infos[name], text))
        return Installed(saved, hook)

    def restore(self, saved: Installed) -> None:
        saved.hook.remove()
        for name, m in self.modules.items():
            m.set_processor(saved.processors[name])
