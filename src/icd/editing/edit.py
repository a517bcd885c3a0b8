"""The edit: a batch ``[sources..., targets...]`` decoded from the inverted noise, one UNet call per step for both
branches, with an attention controller (docs/method.md §8.2, docs/baselines.md §3-6).

The loop does not know which method runs: the `EpsFn` it is handed carries the adapter, the per-row guidance codes,
dynamic CFG and, for the two-pass baselines, the unconditional rows (its method builds it: `icd.methods`). With
`swap_tau`, target rows read their source prompt while t / 1000 > swap_tau (prompt swap, docs/method.md §8.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from icd.editing.attention import AttentionLayers, controlled
from icd.editing.controllers import Controller, MasaCtrl, MasaCtrlControls, P2PControls, PromptToPrompt
from icd.models.base import Cond, EpsFn, LatentDiffusion
from icd.samplers import ddim_loop


@dataclass(frozen=True)
class EditControls:
    """How targets are decoded. guidance: code w = CFG - 1 of the targets (None: the method's default); tau: dynamic
    CFG threshold (None: the adapters' tau for icd, constant guidance otherwise). Exactly one of p2p / masactrl, or
    neither for a plain prompt swap (target rows read the source prompt while t / 1000 > tau, docs/method.md §8.3)."""

    guidance: float | None = None
    tau: float | None = None
    p2p: P2PControls | None = field(default_factory=P2PControls)
    masactrl: MasaCtrlControls | None = None

    def __post_init__(self):
        if self.p2p is not None and self.masactrl is not None:
            raise ValueError("choose Prompt-to-Prompt or MasaCtrl, not both")

    @property
    def control(self) -> str:
        return "masactrl" if self.masactrl is not None else "p2p" if self.p2p is not None else "swap"


def flatten_targets(target_prompts, n_sources: int) -> tuple[list[str], torch.Tensor]:
    """Target prompts given one per image, or a list per image -> (flat targets, source row of each target)."""
    if isinstance(target_prompts, str):
        target_prompts = [target_prompts]
    if len(target_prompts) != n_sources:
        raise ValueError(f"{n_sources} inverted images but {len(target_prompts)} target entries")
    targets, source_of = [], []
    for i, entry in enumerate(target_prompts):
        for prompt in [entry] if isinstance(entry, str) else list(entry):
            targets.append(prompt)
            source_of.append(i)
    return targets, torch.tensor(source_of, dtype=torch.long)


def make_controller(model: LatentDiffusion, layers: AttentionLayers, *, sources: Sequence[str],
                    targets: Sequence[str], source_of: torch.Tensor, num_steps: int,
                    controls: EditControls, latent_shape: tuple[int, int] | None = None) -> Controller:
    """The controller of `controls` for one edit of `num_steps` reverse steps on latents of `latent_shape` (h, w;
    default: the model's native square)."""
    latent_shape = latent_shape or model.latent_shape()[1:]
    joint = getattr(layers, "joint", False)  # an MM-DiT's joint attention (icd.editing.joint_attention)
    last = max(i.index for i in layers.infos.values())
    if controls.p2p is not None:
        if getattr(layers, "p2p_refused", None):  # SD3's joint attention (icd.editing.joint_attention.SD3_P2P)
            raise ValueError(layers.p2p_refused)
        blocks = controls.p2p.blocks
        if blocks is not None and not joint:
            raise ValueError("P2P blocks choose among a transformer's joint-attention blocks; this UNet has none")
        if isinstance(blocks, tuple) and max(blocks) > last:
            raise ValueError(f"P2P blocks must lie in 0..{last} for this transformer, got {blocks}")
        return PromptToPrompt(model.attention_tokenizer, sources, targets, source_of, num_steps=num_steps,
                              controls=controls.p2p, latent_shape=latent_shape)
    if controls.masactrl is not None:
        start = controls.masactrl.start_layer
        if start is not None and not 0 <= start <= last:
            raise ValueError(f"MasaCtrl start layer (--masactrl-layer) must lie in 0..{last} for this "
                             f"{'transformer' if joint else 'UNet'}, got {start}")
        return MasaCtrl(source_of, num_steps, controls.masactrl, first_decoder_layer=layers.mutual_start)
    return Controller(source_of, num_steps)


def _rows(x_sources: torch.Tensor, source_of: torch.Tensor) -> torch.Tensor:
    """[sources; each target's source] in the default memory format (oneDNN may hand back channels-last tensors,
    and a saved-and-loaded inversion must decode bit-identically)."""
    x_sources = x_sources.contiguous()
    return torch.cat([x_sources, x_sources[source_of]]).contiguous()


@torch.no_grad()
def edit_latents(eps: EpsFn, noise: torch.Tensor, cond_src: Cond, cond_tgt: Cond, *, model: LatentDiffusion,
                 layers: AttentionLayers, controller: Controller, timesteps: Sequence[int],
                 swap_tau: float | None = None, schedule=None) -> torch.Tensor:
    """Clean latents [S + T] decoded from `noise` [S] down `timesteps` with `controller` in `model`'s attention
    (`schedule`: the method's, default `model.schedule`)."""
    source_of = controller.source_of
    cond = Cond.cat([cond_src, cond_tgt])
    # prompt swap: target rows read their source's token embeddings; SDXL's pooled embedding stays the target's
    swapped = Cond.cat([cond_src, replace(cond_tgt, tokens=cond_src.tokens[source_of])])
    steps = list(timesteps)

    def step(x: torch.Tensor, t: int, c: Cond) -> torch.Tensor:
        controller.begin_step(steps.index(t), t)
        return eps(x, t, swapped if swap_tau is not None and t / 1000.0 > swap_tau else c)

    controller.prepare(noise.device, model.dtype)  # index tensors built before the loop (compiled UNets read them)
    with controlled(model.unet, controller, layers):
        return ddim_loop(step, _rows(noise, source_of), cond, steps, schedule=schedule or model.schedule,
                         callback=lambda i, t0, t1, x: controller.on_latents(x)).final

