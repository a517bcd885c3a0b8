"""The one pipeline: which model serves a method, the defaults of every task, and invert / decode / edit / generate.

    from icd.pipeline import Pipeline
    pipe = Pipeline.from_pretrained()                          # the embedded model; or a diffusers folder with icd/
    inversion = pipe.invert(images, prompts)                   # iCD: 4 forward calls, deterministic
    result = pipe.edit(inversion, targets, EditControls(...))  # 4 reverse calls for [sources, targets]
    images = pipe.generate(["a small blue star on a white background"])

Methods (`METHODS`; docs/method.md §8, docs/baselines.md §1-4): ``icd`` (forward adapter encodes, reverse adapter
decodes: guidance-distilled UNet, dynamic CFG); ``gddim`` (DDIM on the guidance-distilled UNet); ``ddim`` (DDIM on
the original UNet, two-pass CFG); ``npi`` / ``nti`` (negative-prompt / null-text inversion); ``sdedit`` /
``sdedit-icd`` (noise to the strength's time, denoise with DDIM or iCD jumps, `icd.editing.sdedit`); ``ip2p``
(InstructPix2Pix on our teacher's P2P triples, `icd.editing.ip2p`; weights in ``<model>/ip2p`` or ``ip2p=DIR``).
The arguments of the public entries are checked by `icd.inputs` (TypeError / ValueError naming the argument).

`Pipeline.settings` resolves guidance, tau, steps and re-noising for a (method, task) in one place; the CLI, the
bench and the Python API call it, and everything they run goes through the samplers of `icd.samplers`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from icd.boundaries import Boundaries
from icd.editing import ip2p, sdedit
from icd.editing.arguments import check_edit_arguments, check_fits, check_inversion_type, generation_shape
from icd.editing.attention import AttentionLayers
from icd.editing.checks import MAX_GUIDANCE, check_prompts, check_ranges  # noqa: F401 (re-exported)
from icd.editing.edit import EditControls, baseline_uncond, edit_latents, flatten_targets, make_controller
from icd.editing.inversion import Inversion, model_record
from icd.editing.nulltext import null_text_optimize
from icd.imageio import to_uint8
from icd.inputs import as_images, as_int, as_seed, as_texts
from icd.models import lora
from icd.models.base import EpsFn, LatentDiffusion
from icd.models.loading import (
    ADAPTERS_SUBFOLDER,
    GUIDANCE_UNET,
    ModelError,
    base_unet,
    family_of,
    load_icd_model,
    load_model,
    resolve_model_path,
)
from icd.runtime import resolve_dtype, synchronize
from icd.samplers import (
    SeededNoise,
    StopFn,
    ddim_decode,
    ddim_invert,
    ddim_loop,
    generation_timesteps,
    icd_decode,
    icd_invert,
    initial_noise,
    stoppable,
)

TASKS = ("invert", "edit", "generate")
DEFAULT_GUIDANCE = {"invert": 0.0, "edit": 1.0, "generate": 1.0}  # code w = CFG - 1 (1 is best on the embedded model;
# a Stable Diffusion family has its own: `guidance_default`)
DEFAULT_STEPS = 50  # the DDIM baselines' step count
DEFAULT_DDIM_RULE = "reference"  # DDIM inversion's noise label (icd.samplers.DDIM_RULES); docs/baselines.md §2
DEFAULT_RENOISE = 1.0  # iCD generation's re-noising strength (docs/method.md §8.4, §12); inversion never re-noises
DEFAULT_STRENGTH = 0.4  # SDEdit's start noise level S (t_S = S T), chosen on validation cases (experiments/sdedit.md)


@dataclass(frozen=True)
class MethodSpec:
    """A method: the UNet that serves it (``icd``: distilled + adapters, ``distilled``: adapters off, ``base``:
    the original UNet), how it inverts, and the tasks it takes."""

    name: str
    unet: str
    inversion: str  # "icd" | "ddim" | "sdedit" (the forward process q(x_t | x_0), no UNet call) | "ip2p" (encode)
    tasks: tuple[str, ...]
    summary: str


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("icd", "icd", "icd", TASKS, "forward + reverse consistency models (iCD)"),
    MethodSpec("gddim", "distilled", "ddim", ("invert", "generate"), "DDIM on the guidance-distilled UNet"),
    MethodSpec("ddim", "base", "ddim", TASKS, "DDIM, two-pass classifier-free guidance"),
    MethodSpec("npi", "base", "ddim", ("invert", "edit"), "negative-prompt inversion"),
    MethodSpec("nti", "base", "ddim", ("invert", "edit"), "null-text inversion"),
    MethodSpec(sdedit.METHODS[0], "base", "sdedit", ("invert", "edit"), "SDEdit with the teacher's DDIM steps"),
    MethodSpec(sdedit.METHODS[1], "icd", "sdedit", ("invert", "edit"), "SDEdit with the iCD reverse model's jumps"),
    MethodSpec(ip2p.METHOD, "base", "ip2p", ("invert", "edit"), "InstructPix2Pix trained on the teacher's edits"),
)}


def method_spec(name: str, task: str | None = None) -> MethodSpec:
    """The registered method `name` (for `task`); ValueError listing the valid names otherwise."""
    valid = [m for m in METHODS.values() if task is None or task in m.tasks]
    spec = METHODS.get(name)
    if spec is None or spec not in valid:
        what = f" for {task}" if task else ""
        raise ValueError(f"unknown method {name!r}{what}; choose from {', '.join(m.name for m in valid)}")
    return spec


@dataclass(frozen=True)
class Settings:
    """Resolved settings of one run: guidance code, dynamic-CFG threshold, steps, re-noising strength."""

    method: str
    task: str
    guidance: float
    tau: float | None
    steps: int
    renoise: float
    strength: float | None = None  # SDEdit's start noise level (sdedit methods only)


@dataclass
class EditResult:
    images: np.ndarray  # uint8 [T, H, W, 3], one per target prompt, in the order given
    reconstructions: np.ndarray  # uint8 [S, H, W, 3]: the source branch of the same call
    nfe: int  # UNet calls of this edit (batched rows count once)
    seconds: float


@dataclass
class Reconstruction:
    images: np.ndarray  # uint8 [N, H, W, 3]
    inversion: Inversion
    settings: Settings
    nfe_invert: int
    nfe_decode: int
    seconds_invert: float
    seconds_decode: float


class Pipeline:
    """Invert, reconstruct, edit and generate with one model folder: iCD on its adapters, baselines on its UNets."""

    def __init__(self, icd_model: LatentDiffusion | None, base_model: LatentDiffusion | None = None, *,
                 base_path: Path | None = None, ip2p_path: str | Path | None = None):
        if icd_model is None and base_model is None:
            raise ValueError("a Pipeline needs a model")
        self.icd_model, self._base, self._base_path = icd_model, base_model, base_path
        self._ip2p_path = ip2p_path or (base_path / ip2p.SUBFOLDER if base_path is not None else None)
        self._ip2p: ip2p.IP2PModel | None = None  # loaded on first use of method ip2p
        self._layers: dict[int, AttentionLayers] = {}  # id(unet) -> its attention layers (found once)
        self._records: dict[tuple[int, bool], dict] = {}  # (id(model), adapters) -> its model record (once)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "embedded", *, unet: str | Path | None = None,
                        adapters: str | Path | None = None, lora_forward: str | Path | None = None,
                        lora_reverse: str | Path | None = None, boundaries: Boundaries | str | None = None,
                        device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                        vae_tiling: bool = False, vae_slicing: bool = False, fuse: bool = True,
                        ip2p: str | Path | None = None) -> Pipeline:
        """The embedded model by default; any SD 1.5 / SDXL pipeline folder or hub id (`icd.models.loading`).

        unet: the guidance-distilled UNet (folder, hub id or state-dict file; default ``<model>/unet_guidance``).
        lora_forward / lora_reverse: the authors' released LoRA files; adapters: our adapters folder (default
        ``<model>/icd``). boundaries: a preset or E_R list overriding the adapters'. dtype: None = fp16 on CUDA,
        fp32 on a CPU. vae_tiling / vae_slicing: decode large images / batches in tiles / one image at a time.
        fuse: fold each adapter into its own copy of the weights (fast; two extra copies of the adapted weights);
        False keeps peft's LoRA branches (no extra copies, each call runs the low-rank branches too). ip2p: the
        InstructPix2Pix weights folder (default ``<model>/ip2p``), loaded when method ip2p first runs.
        The baselines' original UNet loads lazily, sharing text encoder and VAE; without a distilled UNet or
        adapters the pipeline serves the baselines only."""
        path = resolve_model_path(name_or_path)
        dtype = resolve_dtype(dtype, device)
        if isinstance(boundaries, str):
            boundaries = Boundaries.parse(boundaries)
        has_icd = any(v is not None for v in (unet, adapters, lora_forward, lora_reverse)) or (
            (path / GUIDANCE_UNET).is_dir() and (path / ADAPTERS_SUBFOLDER / "adapters.json").is_file())
        if not has_icd:
            pipe = cls(None, load_model(name_or_path, device=device, dtype=dtype), base_path=path, ip2p_path=ip2p)
        else:
            pipe = cls(load_icd_model(name_or_path, unet=unet, adapters=adapters, lora_forward=lora_forward,
                                      lora_reverse=lora_reverse, boundaries=boundaries, device=device, dtype=dtype,
                                      fuse=fuse, require_adapters=False), None, base_path=path, ip2p_path=ip2p)
        if vae_tiling:
            pipe.model.vae.enable_tiling()
        if vae_slicing:
            pipe.model.vae.enable_slicing()
        return pipe

    def with_adapters(self, adapters: str | Path) -> Pipeline:
        """A pipeline on the same model folder with other iCD adapters (e.g. an ablation row)."""
        if self._base_path is None:
            raise ValueError("with_adapters needs a pipeline made by Pipeline.from_pretrained")
        return Pipeline.from_pretrained(self._base_path, adapters=adapters, device=self.model.device,
                                        dtype=self.model.dtype, ip2p=self._ip2p_path)

    # ------------------------------------------------------------------ dispatch
    @property
    def model(self) -> LatentDiffusion:
        return self.icd_model if self.icd_model is not None else self._base

    def base(self) -> LatentDiffusion:
        """The original (not guidance-distilled) UNet for the two-pass-CFG baselines."""
        if self._base is None:  # the original UNet beside the iCD model's, sharing its text encoder, VAE, counter
            if self._base_path is None:
                raise ModelError("this pipeline has no original UNet for the baselines (build it with both models)")
            m = self.icd_model
            self._base = m.with_unet(base_unet(self._base_path, dtype=m.dtype, device=m.device))
        return self._base

    def ip2p_model(self) -> ip2p.IP2PModel:
        """The InstructPix2Pix weights (loaded once; `ip2p.IP2PError` naming `icd train ip2p` when missing)."""
        self._ip2p = self._ip2p or ip2p.IP2PModel.load(self._ip2p_path or ip2p.SUBFOLDER, model=self.base())
        return self._ip2p

    def model_for(self, method: str) -> LatentDiffusion:
        """The model serving `method` (METHODS[method].unet)."""
        spec = method_spec(method)
        if spec.unet == "base":
            return self.base()
        if self.icd_model is None or (spec.unet == "icd" and self.icd_model.icd is None):
            raise ModelError(f"method {method!r} needs the guidance-distilled UNet and iCD adapters, and "
                             f"{self._base_path or 'this model'} has no iCD adapters (icd/adapters.json); train them "
                             "with `icd train icd` or pass --adapters DIR")
        return self.icd_model

    def settings(self, method: str, task: str, *, guidance: float | None = None, tau: float | None = None,
                 steps: int | None = None, renoise: float | None = None, strength: float | None = None) -> Settings:
        """Resolve the defaults of (method, task): guidance DEFAULT_GUIDANCE[task]; tau the adapters' for iCD
        inversion and editing, None (constant guidance) otherwise; steps the adapters' segment count for iCD (the
        only count they take), else DEFAULT_STEPS; renoise DEFAULT_RENOISE for iCD generation, else 0; strength
        DEFAULT_STRENGTH for SDEdit (and refused elsewhere)."""
        spec = method_spec(method, task)
        strength = sdedit.resolve_strength(method, strength, default=DEFAULT_STRENGTH)
        check_ranges(guidance=guidance, tau=tau, steps=steps, max_steps=self.model.schedule.num_timesteps)
        if spec.unet == "icd":
            icd = self.model_for(method).icd
            segments = icd.boundaries.num_segments
            if steps not in (None, segments):
                raise ValueError(f"the iCD adapters at {icd.path} take {segments} steps, not {steps} (--steps); other "
                                 "step counts need adapters trained with other boundaries")
            steps = segments
            if tau is None and task != "generate":
                tau = icd.tau
        elif steps is None:
            steps = ip2p.DEFAULT_STEPS if method == ip2p.METHOD else DEFAULT_STEPS
        if renoise is None:
            renoise = DEFAULT_RENOISE if (task == "generate" and method == "icd") else 0.0
        if not 0.0 <= renoise <= 1.0:
            raise ValueError(f"renoise (--renoise) must lie in [0, 1], got {renoise}")
        if renoise and (task != "generate" or method != "icd"):
            raise ValueError("renoise (--renoise) applies to iCD generation only (inversion needs the deterministic "
                             "jumps)")
        if guidance is None:
            guidance = self.guidance_default(method, task)
        return Settings(method=method, task=task, guidance=guidance, tau=tau, steps=steps, renoise=renoise,
                        strength=strength)

    def guidance_default(self, method: str, task: str) -> float:
        """The default guidance code of (method, task): DEFAULT_GUIDANCE on the embedded world; a Stable Diffusion
        family's own codes otherwise (its module's GUIDANCE for the distilled UNet, BASE_GUIDANCE for the
        original: CFG 7.5)."""
        if task == "invert" or self._base_path is None or self.model.vocabulary is not None:
            return DEFAULT_GUIDANCE[task]
        family = family_of(self.model)
        return family.BASE_GUIDANCE if METHODS[method].unet == "base" else family.GUIDANCE[task]

    def decoder_eps(self, method: str, *, guidance, tau: float | None) -> EpsFn:
        """The eps function a method decodes with: the reverse adapter for iCD, the UNet itself otherwise."""
        adapter = lora.REVERSE if method_spec(method).unet == "icd" else None
        return self.model_for(method).eps_fn(adapter=adapter, guidance=guidance, tau=tau)

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
        `icd.samplers.Cancelled`. Bad arguments: TypeError / ValueError naming them. The result records this model."""
        images = as_images(images, value_range=value_range)
        prompts, seed = as_texts(prompts, name="prompts"), as_seed(seed)
        model = self.model_for(method)
        check_prompts(model, prompts)
        st = self.settings(method, "invert", steps=steps, strength=strength)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        z0 = model.encode_images(images)
        kind = METHODS[method].inversion
        record = model_record(model, adapters=METHODS[method].unet == "icd", cache=self._records)
        if kind in ("sdedit", "ip2p"):  # no UNet call: z0 noised to the strength's start time / z0 and IP2P's noise
            inv = (sdedit.encode(model, z0, prompts, method=method, steps=st.steps, strength=st.strength, seed=seed)
                   if kind == "sdedit" else ip2p.encode(model, z0, prompts, steps=st.steps, seed=seed))
            inv.model_record = record
            return inv
        cond = model.encode_prompt(prompts)
        if method == "icd":
            noise = initial_noise(z0.shape[1:], [seed] * z0.shape[0], z0.device)
            timesteps, latents = icd_invert(stoppable(model.eps_fn(adapter=lora.FORWARD), should_stop), z0, cond,
                                            model.icd.boundaries, schedule=model.schedule, noise=noise)
            settings = {"seed": seed}
        else:
            timesteps, latents = ddim_invert(stoppable(model.eps_fn(), should_stop), z0, cond, steps=st.steps,
                                             schedule=model.schedule, rule=ddim_rule)
            settings = {"ddim_rule": ddim_rule}
        inv = Inversion(latents=latents, timesteps=timesteps, prompts=prompts, method=method, settings=settings)
        if method == "nti":
            w = self.guidance_default(method, "edit") if guidance is None else guidance
            inv.null_embeddings = null_text_optimize(model, inv, cond, guidance=w, progress=progress,
                                                     should_stop=should_stop)
            inv.settings["guidance"] = w
        inv.settings["model"], inv.model_record = model.name, record
        return inv

    @torch.no_grad()
    def decode(self, inversion: Inversion, *, guidance: float | None = None, tau: float | None = None,
               should_stop: StopFn | None = None) -> torch.Tensor:
        """Clean latents decoded from `inversion` with its own prompts (a reconstruction)."""
        method = inversion.method
        if method_spec(method).inversion == "ip2p":  # IP2P conditions on the source latent: it is its own record
            return inversion.latents[0]
        st = self.settings(method, "invert", guidance=guidance, tau=tau, steps=sdedit.steps_of(inversion),
                           strength=inversion.settings.get("strength"))
        model = self.model_for(method)
        cond = model.encode_prompt(inversion.prompts)
        eps = stoppable(self.decoder_eps(method, guidance=st.guidance, tau=st.tau), should_stop)
        if method_spec(method).inversion == "sdedit":
            return ddim_loop(eps, inversion.noise, cond, sdedit.decode_timesteps(model, inversion),
                             schedule=model.schedule)[0]
        if method_spec(method).inversion == "icd":
            return icd_decode(eps, inversion.noise, cond, model.icd.boundaries, schedule=model.schedule)
        return ddim_decode(eps, inversion.noise, cond, inversion.timesteps, schedule=model.schedule)

    def reconstruct(self, images, prompts: str | Sequence[str], *, method: str = "icd", steps: int | None = None,
                    guidance: float | None = None, tau: float | None = None, seed: int = 0,
                    ddim_rule: str = DEFAULT_DDIM_RULE, strength: float | None = None,
                    value_range: tuple[float, float] | None = None, should_stop: StopFn | None = None
                    ) -> Reconstruction:
        """Invert, then decode with the same prompts: uint8 reconstructions with the NFE and seconds of each half
        (timed from the input to the uint8 output). Takes what `invert` takes."""
        model = self.model_for(method)
        st = self.settings(method, "invert", guidance=guidance, tau=tau, steps=steps, strength=strength)
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
        return Reconstruction(images=recon, inversion=inv, settings=st, nfe_invert=calls1 - calls0,
                              nfe_decode=model.counter.calls - calls1, seconds_invert=t1 - t0,
                              seconds_decode=t2 - t1)

    # ------------------------------------------------------------------ editing
    def edit(self, inversion: Inversion, target_prompts: Sequence[str] | Sequence[Sequence[str]],
             controls: EditControls | ip2p.IP2PControls | None = None, *,
             should_stop: StopFn | None = None) -> EditResult:
        """Decode [sources, targets] from `inversion` (an `Inversion`; `check_inversion`): one target string or
        non-empty list per image (a bare string: one image's target); controls `EditControls` (SDEdit: no attention
        control), `ip2p.IP2PControls` (IP2P: sources are the VAE round trip) or None; `should_stop` as `invert`.
        Bad arguments: TypeError / ValueError naming them (`icd.editing.arguments.check_edit_arguments`)."""
        target_prompts, method = check_edit_arguments(inversion, target_prompts, controls), inversion.method
        if method_spec(method, "edit").inversion == "ip2p":  # the instruction-conditioned sampler, no controller
            self.check_inversion(inversion)
            t0, calls0 = time.perf_counter(), self.base().counter.calls
            images, recon = ip2p.edit(self.ip2p_model(), self.base(), inversion, target_prompts, controls=controls,
                                      should_stop=should_stop)
            return EditResult(images, recon, self.base().counter.calls - calls0, time.perf_counter() - t0)
        is_sdedit = method_spec(method, "edit").inversion == "sdedit"
        controls = sdedit.sdedit_controls(controls) if is_sdedit else controls or EditControls()
        model = self.model_for(method)
        self.check_inversion(inversion)
        st = self.settings(method, "edit", guidance=controls.guidance, tau=controls.tau,
                           steps=sdedit.steps_of(inversion), strength=inversion.settings.get("strength"))
        t0, calls0 = time.perf_counter(), model.counter.calls
        sources = list(inversion.prompts)
        targets, source_of = flatten_targets(target_prompts, len(sources))
        check_prompts(model, targets)
        cond_src, cond_tgt = model.encode_prompt(sources), model.encode_prompt(targets)
        timesteps = (sdedit.decode_timesteps(model, inversion) if is_sdedit else model.icd.boundaries.reverse_schedule()
                     if method == "icd" else list(reversed(inversion.timesteps)))
        layers = self._attention(model)
        controller = make_controller(model, layers, sources=sources, targets=targets, source_of=source_of,
                                     num_steps=len(timesteps) - 1, controls=controls,
                                     latent_shape=tuple(inversion.noise.shape[-2:]))
        w = torch.full((len(targets),), float(st.guidance))
        s = len(sources)
        if METHODS[method].unet == "icd":  # guidance is an input: sources unguided, targets at their codes
            eps = self.decoder_eps(method, guidance=torch.cat([torch.zeros(s), w]), tau=st.tau)
        else:  # two-pass CFG; sources at their first target's code (the P2P convention guides both branches)
            first = torch.stack([w[(source_of == i).nonzero()[0, 0]] for i in range(s)])
            eps = model.eps_fn(guidance=torch.cat([first, w]), tau=st.tau,
                               uncond=baseline_uncond(model, method, inversion, cond_src, source_of=source_of))
        swap_tau = st.tau if controls.control == "swap" and not is_sdedit else None
        z0 = edit_latents(stoppable(eps, should_stop), inversion.noise, cond_src, cond_tgt, model=model,
                          layers=layers, controller=controller, timesteps=timesteps, swap_tau=swap_tau)
        images = to_uint8(model.decode_latents(z0))  # the loop raises NumericsError naming the step of a NaN/Inf
        return EditResult(images=images[s:], reconstructions=images[:s], nfe=model.counter.calls - calls0,
                          seconds=time.perf_counter() - t0)

    def check_inversion(self, inversion: Inversion) -> None:
        """ValueError unless `inversion` fits this pipeline: a known method, and `icd.editing.arguments.check_fits`
        (the model that made it, its latent shape, the adapters' times); an old inversion has no model record."""
        spec = method_spec(check_inversion_type(inversion).method, "edit")
        model = self.model_for(inversion.method)
        check_fits(inversion, model, kind=spec.inversion,
                   record=model_record(model, adapters=spec.unet == "icd", cache=self._records))

    def _attention(self, model: LatentDiffusion) -> AttentionLayers:
        """The attention layers of `model`'s UNet, found on first use."""
        if id(model.unet) not in self._layers:
            self._layers[id(model.unet)] = AttentionLayers(model.unet)
        return self._layers[id(model.unet)]

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], *, method: str = "icd", steps: int | None = None,
                 guidance: float | None = None, tau: float | None = None, renoise: float | None = None,
                 seed: int = 0, batch_size: int = 64, progress: bool = False, height: int | None = None,
                 width: int | None = None, should_stop: StopFn | None = None) -> torch.Tensor:
        """Text-to-image: images float [N,3,H,W] in [-1, 1] (default: the native square), one per prompt (a bare
        string is one). Sample i starts from noise seeded with ``seed + i`` (in 0..2**64 - 1), and its fresh noise
        (iCD's re-noised jumps, `renoise` = gamma) comes from the same generator. `should_stop` as `invert`."""
        prompts = as_texts(prompts, name="prompts")
        seed, batch_size = as_seed(seed, count=len(prompts)), as_int(batch_size, name="batch_size", low=1)
        st = self.settings(method, "generate", guidance=guidance, tau=tau, steps=steps, renoise=renoise)
        model = self.model_for(method)
        check_prompts(model, prompts)
        eps = stoppable(self.decoder_eps(method, guidance=st.guidance, tau=st.tau), should_stop)
        shape = generation_shape(model, height, width)
        out = []
        for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
            chunk = list(prompts[start : start + batch_size])
            noise = SeededNoise(shape, range(seed + start, seed + start + len(chunk)), model.device)
            x, cond = noise(), model.encode_prompt(chunk)
            if method == "icd":
                z0 = icd_decode(eps, x, cond, model.icd.boundaries, schedule=model.schedule, renoise=st.renoise,
                                fresh_noise=noise)
            else:
                z0 = ddim_loop(eps, x, cond, generation_timesteps(st.steps), schedule=model.schedule)[0]
            out.append(model.decode_latents(z0))
        return torch.cat(out)
