"""The editing API: ``Editor.from_pretrained(...)``, ``invert(images, prompts) -> Inversion``,
``edit(inversion, target_prompts, controls) -> EditResult`` (baselines.md §11.7: stateless, reusable inversions).

Methods (``method=``):
- ``icd``: forward adapter encodes (4 calls), reverse adapter decodes [source, targets] (4 calls), guidance-distilled
  UNet, dynamic CFG on the targets (method.md §8);
- ``ddim``: DDIM inversion and two-pass-CFG DDIM decoding on the original UNet, any step count;
- ``npi``: negative-prompt inversion: DDIM inversion, then CFG with the source prompt as the negative prompt;
- ``nti``: null-text inversion: DDIM inversion plus per-step optimised unconditional embeddings.

Every method takes the same controls: Prompt-to-Prompt (`P2PControls`), MasaCtrl (`MasaCtrlControls`) or a plain
prompt swap. One UNet call per step serves all rows; NFE are counted on the UNet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from icd.editing.attention import AttentionLayers, controlled
from icd.editing.controllers import Controller, MasaCtrl, MasaCtrlControls, P2PControls, PromptToPrompt
from icd.editing.inversion import Inversion, ddim_invert, icd_invert
from icd.editing.loops import cfg_edit, distilled_edit
from icd.editing.nulltext import null_text_optimize
from icd.models import lora
from icd.models.base import Cond, LatentDiffusion, PromptError

METHODS = ("icd", "ddim", "npi", "nti")


@dataclass(frozen=True)
class EditControls:
    """How targets are decoded. guidance: code w = CFG - 1 of the targets (None: the method's default); tau: dynamic
    CFG threshold (None: the adapters' tau for icd, constant guidance otherwise). Exactly one of p2p / masactrl, or
    neither for a plain prompt swap (target rows read the source prompt while t / 1000 > tau, method.md §8.3)."""

    guidance: float | None = None
    tau: float | None = None
    p2p: P2PControls | None = field(default_factory=P2PControls)
    masactrl: MasaCtrlControls | None = None

    def __post_init__(self):
        if self.p2p is not None and self.masactrl is not None:
            raise ValueError("choose Prompt-to-Prompt or MasaCtrl, not both")


@dataclass
class EditResult:
    images: np.ndarray  # uint8 [T, H, W, 3], one per target prompt, in the order given
    reconstructions: np.ndarray  # uint8 [S, H, W, 3]: the source branch of the same call
    nfe: int  # UNet calls of this edit (batched rows count once)
    seconds: float


class Editor:
    """Invert and edit images with one model folder: iCD on its adapters, baselines on its original UNet."""

    def __init__(self, icd_model: LatentDiffusion | None, base_model: LatentDiffusion | None = None,
                 default_guidance: float = 1.0):
        if icd_model is None and base_model is None:
            raise ValueError("an Editor needs a model")
        self.icd_model, self._base = icd_model, base_model
        self.default_guidance = default_guidance
        self._base_path: Path | None = None
        self._layers: dict[int, AttentionLayers] = {}  # id(unet) -> its attention layers (found once)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "embedded", *, adapters: str | Path | None = None,
                        device: str | torch.device = "cpu", default_guidance: float = 1.0) -> Editor:
        """The embedded model by default. Baselines load the original UNet lazily, sharing text encoder and VAE."""
        from icd.models.embedded import load_icd_model, resolve_model_path

        editor = cls(load_icd_model(name_or_path, adapters=adapters, device=device), None, default_guidance)
        editor._base_path = resolve_model_path(name_or_path)
        return editor

    def with_adapters(self, adapters: str | Path) -> Editor:
        """An editor on the same model folder with other iCD adapters (e.g. an ablation row)."""
        if self._base_path is None:
            raise ValueError("with_adapters needs an editor made by Editor.from_pretrained")
        return Editor.from_pretrained(self._base_path, adapters=adapters, device=self.model.device,
                                      default_guidance=self.default_guidance)

    # ------------------------------------------------------------------ models
    @property
    def model(self) -> LatentDiffusion:
        return self.icd_model if self.icd_model is not None else self._base

    def base(self) -> LatentDiffusion:
        """The original (not guidance-distilled) UNet for the two-pass-CFG baselines."""
        if self._base is None:
            from diffusers import UNet2DConditionModel

            m = self.icd_model
            unet = UNet2DConditionModel.from_pretrained(self._base_path / "unet", torch_dtype=m.dtype).to(m.device)
            self._base = LatentDiffusion(tokenizer=m.tokenizer, text_encoder=m.text_encoder, vae=m.vae, unet=unet,
                                         schedule=m.schedule, name=m.name, image_size=m.image_size,
                                         vocabulary=m.vocabulary)
            self._base.counter = m.counter  # one NFE count for the editor
        return self._base

    def _for(self, method: str) -> LatentDiffusion:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method == "icd":
            if self.icd_model is None or self.icd_model.icd is None:
                raise ValueError("method 'icd' needs iCD adapters (Editor.from_pretrained loads them)")
            return self.icd_model
        return self.base()

    # ------------------------------------------------------------------ inversion
    def invert(self, images, prompts: Sequence[str], *, method: str = "icd", steps: int | None = None,
               seed: int = 0, guidance: float | None = None, progress: bool = False) -> Inversion:
        """Invert uint8 images [N, H, W, 3] (or PIL images) with their captions. Deterministic: iCD's encoding
        noise comes from `seed`. `guidance` is NTI's CFG code (default: the editor's default guidance)."""
        prompts = list(prompts)
        model = self._for(method)
        _check_prompts(model, prompts)
        z0 = model.encode_images(images)
        if len(prompts) != z0.shape[0]:
            raise ValueError(f"{z0.shape[0]} images but {len(prompts)} prompts")
        cond = model.encode_prompt(prompts)
        if method == "icd":
            b = model.icd.boundaries
            if steps not in (None, b.num_segments):
                raise ValueError(f"the iCD adapters take {b.num_segments} steps, not {steps}")
            inv = icd_invert(model, z0, cond, prompts, b, seed=seed)
            inv.settings = {"seed": seed}
        else:
            inv = ddim_invert(model, z0, cond, prompts, steps=steps or 50)
            inv.method = method
            if method == "nti":
                w = self.default_guidance if guidance is None else guidance
                inv.null_embeddings = null_text_optimize(model, inv, cond, w, progress=progress)
                inv.settings = {"guidance": w}
        inv.settings["model"] = model.name
        return inv

    # ------------------------------------------------------------------ editing
    def edit(self, inversion: Inversion, target_prompts: Sequence[str] | Sequence[Sequence[str]],
             controls: EditControls | None = None) -> EditResult:
        """Decode [sources, targets] from `inversion`. target_prompts: one per image, or a list per image."""
        controls = controls or EditControls()
        method = inversion.method
        model = self._for(method)
        t0 = time.perf_counter()
        calls0 = model.counter.calls
        sources = list(inversion.prompts)
        targets, source_of = _flatten_targets(target_prompts, len(sources))
        _check_prompts(model, targets)
        cond_src, cond_tgt = model.encode_prompt(sources), model.encode_prompt(targets)
        guidance = self.default_guidance if controls.guidance is None else controls.guidance
        w = torch.full((len(targets),), float(guidance))
        if method == "icd":
            timesteps = model.icd.boundaries.reverse_schedule()
            tau = model.icd.tau if controls.tau is None else controls.tau
        else:
            timesteps = list(reversed(inversion.timesteps))
            tau = controls.tau
        controller = self._controller(model, sources, targets, source_of, len(timesteps) - 1, controls)
        swap_tau = tau if (controls.p2p is None and controls.masactrl is None) else None
        with controlled(model.unet, controller, self._attention(model)):
            if method == "icd":
                model.use_adapter(lora.REVERSE)
                z0 = distilled_edit(model, inversion.noise, timesteps, cond_src, cond_tgt, controller, w, tau,
                                    swap_tau=swap_tau)
            else:
                model.use_adapter(None)
                uncond_at = self._uncond(model, method, inversion, cond_src, source_of)
                z0 = cfg_edit(model, inversion.noise, timesteps, cond_src, cond_tgt, controller, w, tau, uncond_at)
        from icd.imageio import to_uint8

        images = to_uint8(model.decode_latents(z0))  # the loops raise NumericsError naming the step of a NaN/Inf
        s = len(sources)
        return EditResult(images=images[s:], reconstructions=images[:s], nfe=model.counter.calls - calls0,
                          seconds=time.perf_counter() - t0)

    def _attention(self, model: LatentDiffusion) -> AttentionLayers:
        """The attention layers of `model`'s UNet, found on first use."""
        if id(model.unet) not in self._layers:
            self._layers[id(model.unet)] = AttentionLayers(model.unet)
        return self._layers[id(model.unet)]

    def _controller(self, model, sources, targets, source_of, num_steps, controls) -> Controller:
        latent = int(model.unet.config.sample_size)
        if controls.p2p is not None:
            return PromptToPrompt(model.tokenizer, sources, targets, source_of, num_steps, controls.p2p,
                                  latent_size=latent)
        if controls.masactrl is not None:
            first_up = min(i.index for i in self._attention(model).infos.values() if i.place == "up")
            return MasaCtrl(source_of, num_steps, controls.masactrl, first_decoder_layer=first_up)
        return Controller(source_of, num_steps)

    @staticmethod
    def _uncond(model, method, inversion, cond_src: Cond, source_of: torch.Tensor):
        """uncond_at(i) for the two-pass baselines: "" (ddim), the source prompt (npi), NTI's per-step tokens."""
        rows = torch.cat([torch.arange(len(cond_src)), source_of])
        if method == "npi":
            fixed = cond_src.index(rows)
            return lambda i: fixed
        if method == "nti":
            if inversion.null_embeddings is None:
                raise ValueError("this inversion has no null-text embeddings (invert with method='nti')")
            return lambda i: Cond(tokens=inversion.null_embeddings[i][rows])
        empty = model.encode_prompt([""] * len(rows))
        return lambda i: empty


def _flatten_targets(target_prompts, n_sources: int) -> tuple[list[str], torch.Tensor]:
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


def _check_prompts(model: LatentDiffusion, prompts: Sequence[str]) -> None:
    for p in prompts:
        if not p.strip():
            raise PromptError("a prompt is empty")
    model.check_prompts(prompts)
