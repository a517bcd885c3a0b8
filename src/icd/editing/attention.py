"""Attention control through diffusers attention processors (no monkey-patching, no module-level state).

`controlled(unet, controller)` gives every attention layer a `ControlledAttnProcessor` that knows its place
(down/mid/up), whether it is cross-attention, and its index among the UNet's transformer blocks in UNet order
(encoder, middle, decoder; MasaCtrl's "layer L"). At each call the processor projects queries, keys and values and
hands them to the controller's `attend` (`icd.editing.controllers.Controller.attend`), which returns the attention
output. Every control is fused `scaled_dot_product_attention` (`sdpa`) on mixed rows:

- nothing: one call, exactly as diffusers' default processor;
- mutual self-attention (MasaCtrl): the target rows take keys and values from their source rows;
- self-attention injection (P2P): the target rows take queries and keys from their source rows (the source's
  attention map on the target's values);
- word replacement / refinement / reweighting (P2P): the target's mixed map ``(P_src M + P_tgt diag(keep)) diag(e)``
  applied to V_tgt is ``P_src (M diag(e) V_tgt) + P_tgt (diag(keep e) V_tgt)``: two calls with mixed values.

Attention probabilities are materialised (`attention_probs`) only where a controller reads maps (P2P's local
blend, at most 16x16 queries) or asks for them (`Controller.needs_probs`).

The previous processors come back on exit (`AttentionLayers` finds the layers once per UNet). The batch layout is
the controller's business (`icd.editing.controllers`): rows ``[sources..., targets...]`` with a source row per
target row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

PLACES = ("down", "mid", "up")


@dataclass(frozen=True)
class LayerInfo:
    name: str
    place: str  # down | mid | up
    is_cross: bool
    index: int  # transformer-block index in UNet order (encoder, middle, decoder), shared by attn1/attn2


def layer_infos(unet) -> dict[str, LayerInfo]:
    """One `LayerInfo` per attention processor name of `unet`."""
    names = list(unet.attn_processors)

    def place(name: str) -> str:
        return "down" if name.startswith("down_blocks") else "mid" if name.startswith("mid_block") else "up"

    def block(name: str) -> str:
        return name.rsplit(".", 2)[0]  # ...transformer_blocks.K (drop "attnX.processor")

    ordered = sorted(names, key=lambda n: (PLACES.index(place(n)), names.index(n)))
    blocks = list(dict.fromkeys(block(n) for n in ordered))
    return {n: LayerInfo(n, place(n), ".attn2." in n, blocks.index(block(n))) for n in names}


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask: torch.Tensor | None,
         scale: float) -> torch.Tensor:
    """Fused attention on [B, heads, N, d] tensors, as diffusers' default processor calls it."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                          scale=scale)


def attention_probs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """The attention probabilities softmax(q k^T scale + mask) [B, heads, N, K] (materialised: only for maps)."""
    scores = (query @ key.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1)


class ControlledAttnProcessor:
    """A diffusers attention processor that defers to a controller (see the module docstring)."""

    def __init__(self, controller, info: LayerInfo):
        self.controller, self.info = controller, info

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attention_mask is not None:  # sized by the key length, as diffusers does (the text's for cross-attention)
            keys = tokens if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        def split(x):
            return x.view(batch, -1, heads, head_dim).transpose(1, 2)  # [B, heads, N, d]

        query, key, value = split(query), split(key), split(value)
        self.controller.layout(batch)
        out = self.controller.attend(query, key, value, mask=attention_mask, scale=attn.scale, info=self.info,
                                     tokens=tokens)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttentionLayers:
    """The attention modules of one UNet with their `LayerInfo`, found once (a module walk over a peft-wrapped UNet
    costs milliseconds; an edit installs and restores processors every time). Processors are set through
    diffusers' own ``Attention.set_processor``."""

    def __init__(self, unet):
        self.infos = layer_infos(unet)
        self.modules = {f"{name}.processor": m for name, m in unet.named_modules() if isinstance(m, Attention)}
        if set(self.modules) != set(self.infos):
            raise RuntimeError("attention modules and processor names of this UNet disagree")

    @property
    def mutual_start(self) -> int:
        """MasaCtrl's default first layer: the decoder's first transformer block."""
        return min(i.index for i in self.infos.values() if i.place == "up")

    def install(self, controller) -> dict:
        """Route every attention layer through `controller`; returns the processors to restore."""
        saved = {name: m.processor for name, m in self.modules.items()}
        for name, m in self.modules.items():
            m.set_processor(ControlledAttnProcessor(controller, self.infos[name]))
        return saved

    def restore(self, saved: dict) -> None:
        for name, m in self.modules.items():
            m.set_processor(saved[name])


def attention_layers(network):
    """The attention layers of a denoising network: `AttentionLayers` for a UNet, the joint attention layers of an
    MM-DiT (`icd.editing.joint_attention.JointAttentionLayers`) for a FLUX or SD3 transformer."""
    if type(network).__name__ in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
        from icd.editing.joint_attention import JointAttentionLayers  # MM-DiTs only: a UNet edit never loads it

        return JointAttentionLayers(network)
    return AttentionLayers(network)


@contextlib.contextmanager
def controlled(unet, controller, layers: AttentionLayers | None = None):
    """``with controlled(unet, controller): ...`` installs the controller for the block and always restores.
    Pass the UNet's `AttentionLayers` when editing repeatedly (found once instead of per edit)."""
    layers = layers if layers is not None else AttentionLayers(unet)
    saved = layers.install(controller)
    try:
        yield controller
    finally:
        layers.restore(saved)
