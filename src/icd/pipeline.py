"""The one pipeline: the models that serve the methods, and invert / decode / edit / generate dispatched to them.

    from icd.pipeline import Pipeline
    pipe = Pipeline.from_pretrained()                          # the embedded model; or a diffusers folder with icd/
    inversion = pipe.invert(images, prompts)                   # iCD: 4 forward calls, deterministic
    result = pipe.edit(inversion, targets, EditControls(...))  # 4 reverse calls for [sources, targets]
    images = pipe.generate(["a small blue star on a white background"]).images

The methods are objects in one registry (`icd.methods.REGISTRY`; docs/method.md §8, docs/baselines.md §1-4):
``icd``, ``gddim``, ``ddim``, ``npi``, ``nti``, ``sdedit``, ``sdedit-icd``, ``ip2p``. Each owns its defaults, its
UNet, its inversion, decoding and edit; the pipeline holds the models (the guidance-distilled UNet with the iCD
adapters, the original UNet loaded lazily beside it, InstructPix2Pix's weights), asks the registry for the method
and calls it, timing each stage and counting its UNet calls. Every result carries the resolved `Settings`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from icd.boundaries import Boundaries
from icd.editing import ip2p
from icd.editing.arguments import check_edit_arguments, check_fits, check_inversion_type, generation_shape
from icd.editing.attention import AttentionLayers, attention_layers
from icd.editing.edit import EditControls
from icd.editing.inversion import Inversion, model_record
from icd.imageio import to_uint8
from icd.inputs import as_images, as_int, as_seed, as_texts
from icd.methods import DEFAULT_DDIM_RULE, REGISTRY, InversionRun, Method
from icd.methods.base import EditResult, Generation, Reconstruction, Settings
from icd.models import memory
from icd.models.base import EpsFn, LatentDiffusion, check_prompts
from icd.models.loading import (
    ADAPTERS_SUBFOLDER,
    ModelError,
    base_unet,
    family_of_folder,
    guidance_subfolder,
    load_icd_model,
    load_model,
    resolve_model_path,
)
from icd.models.shared import from_modules
from icd.runtime import resolve_dtype, synchronize
from icd.samplers import (
    Cancelled,  # noqa: F401 (re-exported: what a run stopped by its should_stop raises)
    SeededNoise,
    StopFn,
    stoppable,
)


class Pipeline:
    """Invert, reconstruct, edit and generate with one model folder: iCD on its adapters, baselines on its UNets."""

    def __init__(self, icd_model: LatentDiffusion | None, base_model: LatentDiffusion | None = None, *,
                 base_path: Path | None = None, ip2p_path: str | Path | None = None,
                 family_defaults: bool | None = None):
        if icd_model is None and base_model is None:
            raise ValueError("a Pipeline needs a model")
        self.icd_model, self._base, self._base_path = icd_model, base_model, base_path
        self._ip2p_path = ip2p_path or (base_path / ip2p.SUBFOLDER if base_path is not None else None)
        self._ip2p: ip2p.IP2PModel | None = None  # loaded on first use of method ip2p
        self._layers: dict[int, AttentionLayers] = {}  # id(unet) -> its attention layers (found once)
        self._records: dict[tuple[int, bool], dict] = {}  # (id(model), adapters) -> its model record (once)
        # a Stable Diffusion family's own guidance codes (`Method.guidance_default`); a bare Pipeline(...) of test
        # models keeps the embedded world's
        self.family_defaults = base_path is not None if family_defaults is None else family_defaults
        self._compile: str | bool | None = None  # the compile mode of every UNet, the lazy one too (`compile`)
        self._vae_spec: str | Path | None = None  # a user-given VAE (`from_pretrained(vae=...)`)

    def compile(self, mode: str | bool | None = "auto") -> Pipeline:
        """Run every UNet's sampling calls through ``torch.compile`` (`icd.models.compiled`: ``auto`` is
        reduce-overhead with CUDA graphs on CUDA; None: eager again); the baselines' UNet when it loads."""
        self._compile = mode
        for m in {id(m): m for m in (self.icd_model, self._base) if m is not None}.values():
            m.compile(mode)
        return self

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "embedded", *, unet: str | Path | None = None,
                        adapters: str | Path | None = None, lora_forward: str | Path | None = None,
                        lora_reverse: str | Path | None = None, boundaries: Boundaries | str | None = None,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        vae_tiling: bool = False, vae_slicing: bool = False, fuse: bool = True,
                        ip2p: str | Path | None = None, vae: str | Path | None = None,
                        compile: str | bool | None = None, offload: str = "none") -> Pipeline:
        """The embedded model by default; any SD 1.5 / SDXL pipeline folder or hub id (`icd.models.loading`).

        unet: the guidance-distilled UNet (folder, hub id or state-dict file; default ``<model>/unet_guidance``).
        lora_forward / lora_reverse: the authors' released LoRA files; adapters: our adapters folder (default
        ``<model>/icd``). boundaries: a preset or E_R list overriding the adapters'. dtype: None = fp16 on CUDA,
        fp32 on a CPU. vae_tiling / vae_slicing: decode large images / batches in tiles / one image at a time.
        fuse: fold each adapter into its own copy of the weights (fast; two extra copies of the adapted weights);
        False keeps peft's LoRA branches (no extra copies, each call runs the low-rank branches too). ip2p: the
        InstructPix2Pix weights folder (default ``<model>/ip2p``), loaded when method ip2p first runs. vae: a VAE
        folder or hub id replacing the pipeline's (an fp16-safe SDXL VAE: `icd.models.vae`). compile: a
        `torch.compile` mode for the UNets' sampling calls (`compile`; None: eager). offload: ``none``, ``model``
        (each component on `device` only for its own calls) or ``sequential`` (each submodule: least memory, slowest),
        unfused (`icd.models.memory`); a load that cannot fit is refused in one line before any weight loads.
        The baselines' original UNet loads lazily, sharing text encoder and VAE; without a distilled UNet or
        adapters the pipeline serves the baselines only."""
        path = resolve_model_path(name_or_path)
        dtype = resolve_dtype(dtype, device)
        if isinstance(boundaries, str):
            boundaries = Boundaries.parse(boundaries)
        # the guidance-distilled network loads when the folder has one of its own (gddim then runs without adapters),
        # or adapters to put on it (FLUX.1-dev: its transformer itself, not loaded twice for the baselines otherwise)
        distilled = guidance_subfolder(path)
        has_adapters = (path / ADAPTERS_SUBFOLDER / "adapters.json").is_file()
        has_icd = any(v is not None for v in (unet, adapters, lora_forward, lora_reverse)) or (
            (path / distilled).is_dir() and (has_adapters or distilled != family_of_folder(path).DENOISER))
        if offload != "none" and compile:
            raise ModelError("--offload cannot be combined with --compile (compiled graphs hold the weights' places)")
        memory.check_fits(path, device, dtype, offload, icd=has_icd, adapters=adapters, fuse=fuse,
                          name=str(name_or_path))
        fuse, load_device = (fuse, device) if offload == "none" else (False, "cpu")  # offloaded: loaded on the CPU
        if not has_icd:
            pipe = cls(None, load_model(name_or_path, device=load_device, dtype=dtype), base_path=path,
                       ip2p_path=ip2p)
        else:
            pipe = cls(load_icd_model(name_or_path, unet=unet, adapters=adapters, lora_forward=lora_forward,
                                      lora_reverse=lora_reverse, boundaries=boundaries, device=load_device,
                                      dtype=dtype, fuse=fuse, require_adapters=False), None, base_path=path,
                       ip2p_path=ip2p)
        if vae_tiling:
            pipe.model.vae.enable_tiling()
        if vae_slicing:
            pipe.model.vae.enable_slicing()
        if vae is not None:
            from icd.models.vae import load_vae, use_vae  # diffusers' VAE class: only when one is given

            use_vae(pipe.model, load_vae(vae, dtype=dtype, device=load_device))
            pipe._vae_spec = vae
        memory.apply_offload(pipe.model, offload, device)
        return pipe.compile(compile) if compile else pipe

    @classmethod
    def from_diffusers(cls, pipe, *, unet=None, lora_forward: str | Path | None = None,
                       lora_reverse: str | Path | None = None, adapters: str | Path | None = None,
                       fuse: bool = True, ip2p: str | Path | None = None) -> Pipeline:
        """A pipeline sharing the modules of an already loaded diffusers `StableDiffusionPipeline` /
        `StableDiffusionXLPipeline` (on the device and dtype its user put it): its tokenizers, text encoders and
        VAE serve every method and its UNet the baselines; nothing of it is loaded again.

        unet: the guidance-distilled UNet (a `UNet2DConditionModel`, or a folder, hub id or state-dict file; default
        ``<folder>/unet_guidance`` where `pipe` was loaded from a folder that has one); lora_forward / lora_reverse:
        the released LoRA files, or adapters: our adapters folder (default ``<folder>/icd``). Without a distilled
        UNet the pipeline serves the baselines only."""
        base, icd_model, folder = from_modules(pipe, unet=unet, lora_forward=lora_forward, lora_reverse=lora_reverse,
                                               adapters=adapters, fuse=fuse)
        return cls(icd_model, base, base_path=folder, ip2p_path=ip2p,
                   family_defaults=base.vocabulary is None)

    def with_adapters(self, adapters: str | Path) -> Pipeline:
        """A pipeline on the same model folder with other iCD adapters (e.g. an ablation row)."""
        if self._base_path is None:
            raise ValueError("with_adapters needs a pipeline made by Pipeline.from_pretrained")
        return Pipeline.from_pretrained(self._base_path, adapters=adapters, device=self.model.device,
                                        dtype=self.model.dtype, ip2p=self._ip2p_path, vae=self._vae_spec,
                                        compile=self._compile, offload=memory.offload_mode(self.model))

    # ------------------------------------------------------------------ the models the methods run on
    @property
    def model(self) -> LatentDiffusion:
        return self.icd_model if self.icd_model is not None else self._base

    def base(self) -> LatentDiffusion:
        """The original (not guidance-distilled) UNet for the two-pass-CFG baselines."""
        if self._base is None:  # the original UNet beside the iCD model's, sharing its text encoder, VAE, counter
            if self._base_path is None:
                raise ModelError("this pipeline has no original UNet for the baselines (build it with both models)")
            m, offload = self.icd_model, memory.offload_mode(self.icd_model)
            unet = base_unet(self._base_path, dtype=m.dtype, device=m.device if offload == "none" else "cpu")
            self._base = memory.apply_offload(m.with_unet(unet), offload, m.device)  # joins the model's offload
            if self._compile:
                self._base.compile(self._compile)
        return self._base

    def ip2p_model(self) -> ip2p.IP2PModel:
        """The InstructPix2Pix weights (loaded once; `ip2p.IP2PError` naming `icd train ip2p` when missing)."""
        self._ip2p = self._ip2p or ip2p.IP2PModel.load(self._ip2p_path or ip2p.SUBFOLDER, model=self.base())
        return self._ip2p

    def unet_model(self, unet: str, method: str) -> LatentDiffusion:
        """The model around `unet` (``base``: the original UNet; ``icd`` / ``distilled``: the guidance-distilled
        one, with / without its adapters) for `method`; ModelError when this pipeline lacks it."""
        if unet == "base":
            return self.base()
        if self.icd_model is None or (unet == "icd" and self.icd_model.icd is None):
            raise ModelError(f"method {method!r} needs the guidance-distilled UNet and iCD adapters, and "
                             f"{self._base_path or 'this model'} has no iCD adapters (icd/adapters.json); train them "
                             "with `icd train icd` or pass --adapters DIR")
        return self.icd_model

    def attention(self, model: LatentDiffusion) -> AttentionLayers:
        """The attention layers of `model`'s UNet, found on first use."""
        if id(model.unet) not in self._layers:
            self._layers[id(model.unet)] = attention_layers(model.unet)
        return self._layers[id(model.unet)]

    def method(self, name: str, task: str | None = None) -> Method:
        """The registered method `name` (serving `task`): ValueError listing the valid names otherwise."""
        return REGISTRY.get(name, task)

    def offers(self, method: str) -> bool:
        """Whether `method` runs on this pipeline: on its model kind (`Entry.models`), and with the
        guidance-distilled UNet / iCD adapters it needs (`unet_model`) loaded; never loads a model."""
        m = REGISTRY.get(method)
        if self.model.kind not in m.models:
            return False
        if m.unet == "base":
            return self._base is not None or self._base_path is not None
        return self.icd_model is not None and (m.unet != "icd" or self.icd_model.icd is not None)

    def model_for(self, method: str) -> LatentDiffusion:
        """The model serving `method` (its UNet, whose counter counts its calls)."""
        return REGISTRY.get(method).model(self)

    def settings(self, method: str, task: str, *, guidance: float | None = None, tau: float | None = None,
                 steps: int | None = None, renoise: float | None = None, strength: float | None = None,
                 seed: int | None = None) -> Settings:
        """The resolved defaults of (method, task) (`icd.methods.Method.settings`): guidance DEFAULT_GUIDANCE[task]
        (a Stable Diffusion family's own codes); tau the adapters' for iCD inversion and editing; steps the
        adapters' segment count for iCD, the method's default otherwise; renoise DEFAULT_RENOISE for iCD
        generation; strength DEFAULT_STRENGTH for SDEdit (refused elsewhere)."""
        return REGISTRY.get(method, task).settings(self, task, guidance=guidance, tau=tau, steps=steps,
                                                   renoise=renoise, strength=strength, seed=seed)

    def guidance_default(self, method: str, task: str) -> float:
        """The default guidance code of (method, task) (`icd.methods.Method.guidance_default`)."""
        return REGISTRY.get(method).guidance_default(self, task)

    def decoder_eps(self, method: str, *, guidance, tau: float | None) -> EpsFn:
        """The eps function a method decodes with: the reverse adapter for iCD, the UNet itself otherwise."""
        m = REGISTRY.get(method)
        return m.decoder_eps(m.model(self), guidance=guidance, tau=tau)

    # ------------------------------------------------------------------ inversion
    def invert(self, images, prompts: str | Sequence[str], *, method: str = "icd", steps: int | None = None,
               seed: int = 0, guidance: float | None = None, progress: bool = False,
               ddim_rule: str = DEFAULT_DDIM_RULE, strength: float | None = None,
               value_range: tuple[float, float] | None = None, should_stop: StopFn | None = None) -> Inversion:
        """Invert `images` (uint8 [H, W, 3] / [N, H, W, 3] arrays, PIL images, lists of them, torch tensors; floats
        only with `value_range` (0, 1) or (-1, 1): `icd.inputs.as_images`) with their captions `prompts` (one per
        image; a bare string is one). Deterministic: iCD's encoding noise and SDEdit's draw come from `seed` (an int
        in 0..2**64 - 1). `guidance`: NTI's CFG code (default: the edit's). `ddim_rule`: `icd.samplers.DDIM_RULES`.
        `strength`: SDEdit's start noise level (no UNet call). `should_stop`: asked once per step, True raises
        `icd.samplers.Cancelled`. Bad arguments: TypeError / ValueError naming them. The result records this model;
        its `run` holds the resolved settings, the UNet calls and the seconds (not saved)."""
        images = as_images(images, value_range=value_range)
        prompts, seed = as_texts(prompts, name="prompts"), as_seed(seed)
        m = REGISTRY.get(method, "invert")
        model = m.model(self)
        check_prompts(model, prompts)
        st = m.settings(self, "invert", steps=steps, strength=strength, seed=seed)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        calls0, t0 = model.counter.calls, time.perf_counter()
        z0 = model.encode_images(images)
        record = model_record(model, adapters=m.unet == "icd", cache=self._records)
        inv = m.invert(self, model, z0, prompts, st=st, guidance=guidance, ddim_rule=ddim_rule, progress=progress,
                       should_stop=should_stop)
        inv.settings["model"], inv.model_record = model.name, record
        synchronize(model.device)
        inv.run = InversionRun(settings=m.run_settings(st, inv), nfe=model.counter.calls - calls0,
                               seconds=time.perf_counter() - t0)
        return inv

    def decode(self, inversion: Inversion, *, guidance: float | None = None, tau: float | None = None,
               should_stop: StopFn | None = None) -> torch.Tensor:
        """Clean latents decoded from `inversion` with its own prompts (a reconstruction)."""
        m = REGISTRY.get(inversion.method, "invert")
        st = m.settings(self, "invert", guidance=guidance, tau=tau, steps=m.inversion_steps(inversion),
                        strength=inversion.settings.get("strength"))
        return m.decode(self, inversion, st, should_stop=should_stop)

    def reconstruct(self, images, prompts: str | Sequence[str], *, method: str = "icd", steps: int | None = None,
                    guidance: float | None = None, tau: float | None = None, seed: int = 0,
                    ddim_rule: str = DEFAULT_DDIM_RULE, strength: float | None = None,
                    value_range: tuple[float, float] | None = None, should_stop: StopFn | None = None
                    ) -> Reconstruction:
        """Invert, then decode with the same prompts: uint8 reconstructions with the NFE and seconds of each half
        (timed from the input to the uint8 output). Takes what `invert` takes."""
        m = REGISTRY.get(method, "invert")
        model = m.model(self)
        st = m.settings(self, "invert", guidance=guidance, tau=tau, steps=steps, strength=strength, seed=as_seed(seed))
        calls0 = model.counter.calls
        synchronize(model.device)
        t0 = time.perf_counter()
        inv = self.invert(images, prompts, method=method, steps=steps, seed=seed, ddim_rule=ddim_rule,
                          strength=strength, value_range=value_range, should_stop=should_stop)
        synchronize(model.device)
        t1, calls1 = time.perf_counter(), model.counter.calls
        recon = to_uint8(model.decode_latents(self.decode(inv, guidance=st.guidance, tau=st.tau,
                                                          should_stop=should_stop)))
        synchronize(model.device)
        t2 = time.perf_counter()
        return Reconstruction(images=recon, inversion=inv, settings=replace(st, extra=inv.run.settings.extra),
                              nfe_invert=calls1 - calls0, nfe_decode=model.counter.calls - calls1,
                              seconds_invert=t1 - t0, seconds_decode=t2 - t1)

    # ------------------------------------------------------------------ editing
    def edit(self, inversion: Inversion, target_prompts: Sequence[str] | Sequence[Sequence[str]],
             controls: EditControls | ip2p.IP2PControls | None = None, *,
             should_stop: StopFn | None = None) -> EditResult:
        """Decode [sources, targets] from `inversion` (an `Inversion`; `check_inversion`): one target string or
        non-empty list per image (a bare string: one image's target); controls the method's (`Method.controls_type`:
        `EditControls`, without attention control for SDEdit; `ip2p.IP2PControls` for IP2P, whose sources are the
        VAE round trip) or None; `should_stop` as `invert`. Bad arguments: TypeError / ValueError naming them
        (`icd.editing.arguments.check_edit_arguments`)."""
        m = REGISTRY.get(check_inversion_type(inversion).method, "edit")
        target_prompts = check_edit_arguments(inversion, target_prompts, controls, controls_type=m.controls_type)
        self.check_inversion(inversion)
        model = m.model(self)
        calls0, t0 = model.counter.calls, time.perf_counter()
        images, recon, st = m.edit(self, inversion, target_prompts, controls, should_stop=should_stop)
        return EditResult(images=images, reconstructions=recon, nfe=model.counter.calls - calls0,
                          seconds=time.perf_counter() - t0, settings=st)

    def check_inversion(self, inversion: Inversion) -> None:
        """ValueError unless `inversion` fits this pipeline: a known method, `icd.editing.arguments.check_fits` (the
        model that made it, its latent shape; an old inversion has no model record) and what its method checks
        (`Method.check_inversion`: e.g. the adapters' times; a saved inversion from another model or adapters
        would decode to garbage)."""
        m = REGISTRY.get(check_inversion_type(inversion).method, "edit")
        model = m.model(self)
        check_fits(inversion, model, record=model_record(model, adapters=m.unet == "icd", cache=self._records))
        m.check_inversion(model, inversion)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, method: str = "icd", steps: int | None = None,
                 guidance: float | None = None, tau: float | None = None, renoise: float | None = None,
                 seed: int = 0, batch_size: int = 64, progress: bool = False, height: int | None = None,
                 width: int | None = None, should_stop: StopFn | None = None) -> Generation:
        """Text-to-image: `Generation.images` float [N,3,H,W] in [-1, 1] (default: the native square), one per
        prompt (a bare string is one), with the resolved settings, UNet calls and seconds. Sample i starts from noise
        seeded with ``seed + i`` (in 0..2**64 - 1), and its fresh noise (iCD's re-noised jumps, `renoise` = gamma)
        comes from the same generator. `should_stop` as `invert`."""
        prompts = as_texts(prompts, name="prompts")
        seed, batch_size = as_seed(seed, count=len(prompts)), as_int(batch_size, name="batch_size", low=1)
        m = REGISTRY.get(method, "generate")
        st = m.settings(self, "generate", guidance=guidance, tau=tau, steps=steps, renoise=renoise, seed=seed)
        model = m.model(self)
        check_prompts(model, prompts)
        eps = stoppable(m.decoder_eps(model, guidance=st.guidance, tau=st.tau), should_stop)
        shape = generation_shape(model, height, width)
        calls0, t0 = model.counter.calls, time.perf_counter()
        out = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
            chunk = list(prompts[start : start + batch_size])
            noise = SeededNoise(shape, range(seed + start, seed + start + len(chunk)), model.device)
            z0 = m.generate_latents(model, eps, noise, model.encode_prompt(chunk), st=st)
            out.append(model.decode_latents(z0))
        synchronize(model.device)
        return Generation(images=torch.cat(out), settings=st, nfe=model.counter.calls - calls0,
                          seconds=time.perf_counter() - t0)
