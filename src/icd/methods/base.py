"""An editing method as an object, the registry every front end reads, and what a run returns.

A `Method` owns everything that differs between methods: its defaults (steps, guidance, tau, strength), the UNet it
runs on (``unet``: ``icd`` = guidance-distilled + iCD adapters, ``distilled`` = adapters off, ``base`` = the
original), how it inverts, decodes and edits, how it checks a saved inversion, which controls it accepts
(`attention_control`, `takes_tau`, `takes_strength`, `options`) and the model whose counter counts its UNet calls.
`icd.pipeline.Pipeline` only dispatches: it asks `REGISTRY.get(name, task)` and calls the object.

The methods reach the pipeline's models through a small host interface (`Host`: the pipeline itself), so this
layer sits between the samplers / editing below and the pipeline above and imports neither the pipeline nor any
front end. A new method is one module with one subclass and one entry in `icd.methods` (`BUILTIN`: its menu, which
the class takes when it is defined; the registry lives in `icd.methods.registry`, light to import); a test or a
plug-in registers an object for a while with ``with REGISTRY.registered(MyMethod()): ...``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch

from icd.editing.attention import AttentionLayers
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls, edit_latents, flatten_targets, make_controller
from icd.editing.inversion import Inversion
from icd.guidance import check_guidance, check_tau
from icd.imageio import to_uint8
from icd.methods.registry import MENU, MODEL_KINDS, REGISTRY, TASKS, entry_of
from icd.models.base import Cond, EpsFn, LatentDiffusion, check_prompts
from icd.models.loading import family_of
from icd.samplers import StopFn, ddim_loop, generation_timesteps, inversion_timesteps, stoppable
from icd.schedule import check_steps

DEFAULT_GUIDANCE = {"invert": 0.0, "edit": 1.0, "generate": 1.0}  # code w = CFG - 1 (1 is best on the embedded model;
# a Stable Diffusion family has its own: `Method.guidance_default`)
DEFAULT_STEPS = 50  # the DDIM baselines' step count
DEFAULT_DDIM_RULE = "reference"  # DDIM inversion's noise label (icd.samplers.DDIM_RULES); docs/baselines.md §2
DEFAULT_RENOISE = 1.0  # iCD generation's re-noising strength (docs/method.md §8.4, §12); inversion never re-noises


class Host(Protocol):
    """What a method needs of the pipeline that runs it."""

    model: LatentDiffusion  # the pipeline's main model (the one whose family sets the defaults)
    family_defaults: bool  # True: a Stable Diffusion family's own guidance codes apply (`Method.guidance_default`)

    def unet_model(self, unet: str, method: str) -> LatentDiffusion: ...  # the model around that UNet
    def attention(self, model: LatentDiffusion) -> AttentionLayers: ...  # its attention layers (found once)
    def ip2p_model(self): ...  # the InstructPix2Pix weights (`icd.editing.ip2p.IP2PModel`, loaded once)


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Settings:
    """Resolved settings of one run: guidance code, dynamic-CFG threshold, steps, re-noising strength, SDEdit's
    strength, the seed, and what else the method resolved (`extra`: DDIM's rule, IP2P's instruction and scales)."""

    method: str
    task: str
    guidance: float
    tau: float | None
    steps: int
    renoise: float
    strength: float | None = None  # SDEdit's start noise level (methods that take one only)
    seed: int | None = None  # the encoding / sampling noise's seed (None: the task draws no noise)
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def as_dict(self) -> dict:
        """Plain JSON-ready values (`extra` merged in)."""
        out = asdict(self)
        out |= out.pop("extra")
        return out


@dataclass
class EditResult:
    images: np.ndarray  # uint8 [T, H, W, 3], one per target prompt, in the order given
    reconstructions: np.ndarray  # uint8 [S, H, W, 3]: the source branch of the same call
    nfe: int  # UNet calls of this edit (batched rows count once)
    seconds: float
    settings: Settings | None = None  # what the edit ran with (method, steps, guidance, tau, strength, extra)


@dataclass
class Reconstruction:
    images: np.ndarray  # uint8 [N, H, W, 3]
    inversion: Inversion
    settings: Settings
    nfe_invert: int
    nfe_decode: int
    seconds_invert: float
    seconds_decode: float


@dataclass
class Generation:
    images: torch.Tensor  # float [N, 3, H, W] in [-1, 1]
    settings: Settings
    nfe: int  # UNet calls (batched rows count once)
    seconds: float

    def uint8(self) -> np.ndarray:
        """The images as uint8 [N, H, W, 3]."""
        return to_uint8(self.images)


@dataclass(frozen=True)
class InversionRun:
    """What a `Pipeline.invert` call ran with and cost (attached to the `Inversion` it returns, not saved)."""

    settings: Settings
    nfe: int
    seconds: float


class EditInputs(NamedTuple):
    """What `Method.edit_inputs` resolves for an edit (unpacked by the methods' `edit`)."""

    controls: Any
    model: LatentDiffusion
    st: Settings
    sources: list[str]
    targets: list[str]
    source_of: torch.Tensor  # the source row of each target
    cond_src: Cond
    cond_tgt: Cond


# ---------------------------------------------------------------------------------------------- the method
class Method:
    """One editing / inversion / generation method (module docstring). Subclasses set the class attributes and
    override the hooks that differ; the defaults are DDIM on the UNet named by `unet`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    unet: ClassVar[str] = "base"  # "icd" | "distilled" | "base"
    tasks: ClassVar[tuple[str, ...]] = TASKS
    default_steps: ClassVar[int] = DEFAULT_STEPS
    renoises: ClassVar[bool] = False  # its generation takes re-noised jumps (`renoise`)
    own_steps: ClassVar[bool] = False  # True: the step count is the adapters' (no K in a bench name)
    attention_control: ClassVar[bool] = True  # takes Prompt-to-Prompt, MasaCtrl or a prompt swap
    takes_tau: ClassVar[bool] = True  # takes a dynamic-CFG threshold
    takes_strength: ClassVar[bool] = False  # takes SDEdit's strength S
    options: ClassVar[tuple[str, ...]] = ()  # its own request fields (e.g. IP2P's instruction, image_guidance)
    weights: ClassVar[str | None] = None  # the option naming weights of its own (IP2P: ``ip2p``, `--ip2p DIR`)
    models: ClassVar[tuple[str, ...]] = MODEL_KINDS  # the model kinds it runs on (`LatentDiffusion.kind`)
    controls_type: ClassVar[type] = EditControls  # what `Pipeline.edit` takes as controls
    bench_guidance: ClassVar[bool] = True  # a benchmark runs it at the run's guidance code (False: its own scales)
    p2p_defaults: ClassVar[dict] = dict(cross_replace=0.2, self_replace=0.5, reweight_new_words=3.0)  # the
    # benchmark's Prompt-to-Prompt settings (NPI's paper for the DDIM family; docs/baselines.md §3-4)

    def __init_subclass__(cls, **kwargs):
        """A built-in method's class takes its menu (`registry.MENU`: name, summary, tasks, ...) from its entry in
        `icd.methods.BUILTIN`, where alone it is written."""
        super().__init_subclass__(**kwargs)
        entry = entry_of(cls)
        if entry is not None:
            twice = [k for k in MENU if k in vars(cls)]
            if twice:
                raise TypeError(f"{entry.target} sets {', '.join(twice)}: a built-in method's menu is its entry's "
                                "(icd.methods.BUILTIN)")
            for key, value in entry.menu().items():
                setattr(cls, key, value)

    def __repr__(self) -> str:
        return f"<method {self.name}: {self.summary}>"

    # ------------------------------------------------------------------ settings
    def model(self, host: Host) -> LatentDiffusion:
        """The model serving this method (its UNet, the pipeline's text encoder and VAE); ValueError when the model
        is of a kind the method does not run on (`models`)."""
        model = host.unet_model(self.unet, self.name)
        if model.kind not in self.models:
            needs = ("a rectified-flow model such as --model embedded-flow" if self.models == ("flow",) else
                     "an epsilon-prediction (Stable Diffusion family) model such as --model embedded")
            raise ValueError(f"method {self.name} needs {needs}; {model.name} is a {model.family} {model.kind} model")
        return model

    def schedule(self, model: LatentDiffusion):
        """The schedule this method steps on: the model's as iCD's math uses it (time 0 is clean data, DDIM's trailing
        grid; `icd.schedule.NoiseSchedule`)."""
        return model.schedule

    def resolve_steps(self, host: Host, steps: int | None) -> int:
        """The step count of a run: `steps`, else `default_steps`."""
        return self.default_steps if steps is None else steps

    def default_tau(self, host: Host, task: str) -> float | None:
        """The dynamic-CFG threshold when none is given: constant guidance."""
        return None

    def default_renoise(self, task: str) -> float:
        """The re-noising strength gamma of a run (`renoises` methods' generation only)."""
        return DEFAULT_RENOISE if self.renoises and task == "generate" else 0.0

    def resolve_strength(self, strength: float | None) -> float | None:
        """SDEdit's strength: refused by a method that takes none."""
        if strength is not None:
            raise ValueError(f"strength (--strength) applies to {' / '.join(REGISTRY.names(strength=True))}, not "
                             f"{self.name}")
        return None

    def guidance_default(self, host: Host, task: str) -> float:
        """The default guidance code of `task`: DEFAULT_GUIDANCE on the embedded world; a Stable Diffusion
        family's own codes otherwise (its module's GUIDANCE for the distilled UNet, BASE_GUIDANCE for the
        original: CFG 7.5)."""
        if task in ("invert", "reconstruct") or not host.family_defaults or host.model.vocabulary is not None:
            return DEFAULT_GUIDANCE["invert" if task == "reconstruct" else task]
        family = family_of(host.model)
        return family.BASE_GUIDANCE if self.unet == "base" else family.GUIDANCE[task]

    def settings(self, host: Host, task: str, *, guidance: float | None = None, tau: float | None = None,
                 steps: int | None = None, renoise: float | None = None, strength: float | None = None,
                 seed: int | None = None) -> Settings:
        """Every default of `task` resolved and every range checked (ValueError naming the option)."""
        strength = self.resolve_strength(strength)
        if guidance is not None:
            check_guidance(guidance)
        if tau is not None:
            check_tau(tau)
        if steps is not None:
            check_steps(steps, self.model(host).schedule.num_timesteps)
        steps = self.resolve_steps(host, steps)
        if tau is None and task != "generate":
            tau = self.default_tau(host, task)
        renoise = self.default_renoise(task) if renoise is None else renoise
        if not 0.0 <= renoise <= 1.0:
            raise ValueError(f"renoise (--renoise) must lie in [0, 1], got {renoise}")
        if renoise and (task != "generate" or not self.renoises):
            raise ValueError("renoise (--renoise) applies to iCD generation only (inversion needs the deterministic "
                             "jumps)")
        if guidance is None:
            guidance = self.guidance_default(host, task)
        return Settings(method=self.name, task=task, guidance=guidance, tau=tau, steps=steps, renoise=renoise,
                        strength=strength, seed=seed)

    def prepare(self, host: Host) -> None:
        """Load what the method needs beyond the pipeline's UNets (IP2P's weights), so a missing file fails early."""

    # ------------------------------------------------------------------ inversion
    def encoder_eps(self, model: LatentDiffusion) -> EpsFn:
        """The unguided network that inverts (DDIM: the UNet itself)."""
        return model.eps_fn()

    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        """The record of clean latents `z0` [N, 4, h, w] with their `prompts`: unguided (`encoder_eps`) with the
        source prompt up the grid of `st.steps` on `schedule` (`icd.samplers.inversion_timesteps`), stepped by
        `invert_path` (DDIM; `ddim_rule`: the noise's timestep label)."""
        cond = model.encode_prompt(prompts)
        schedule = self.schedule(model)
        times = inversion_timesteps(st.steps, schedule)
        with torch.no_grad():
            latents = self.invert_path(stoppable(self.encoder_eps(model), should_stop), z0, cond, times,
                                       schedule=schedule, ddim_rule=ddim_rule)
        return Inversion(latents=latents, timesteps=times, prompts=prompts, method=self.name,
                         settings=self.path_settings(ddim_rule))

    def invert_path(self, eps: EpsFn, z0: torch.Tensor, cond: Cond, timesteps: list[int], *, schedule,
                    ddim_rule: str) -> list[torch.Tensor]:
        """The sampling loop of the default `invert`, the hook a method with another solver overrides (the flow
        methods' Euler / FireFlow paths): every latent visited from `z0` up the ascending `timesteps`, the start
        included. DDIM's jumps, the noise labelled by `ddim_rule`."""
        return ddim_loop(eps, z0, cond, timesteps, schedule=schedule, label=ddim_rule).visited

    def path_settings(self, ddim_rule: str) -> dict:
        """What the default `invert`'s record keeps of how `invert_path` ran (DDIM: its rule)."""
        return {"ddim_rule": ddim_rule}

    def run_settings(self, st: Settings, inversion: Inversion) -> Settings:
        """What an inversion ran with: `st` and what its record adds (DDIM's rule)."""
        return with_extra(st, **{k: v for k, v in inversion.settings.items()
                                 if k not in ("seed", "strength", "steps", "model")})

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        """What an inversion depends on beyond the image, prompt and step count (a cache's key): DDIM nothing."""
        return ()

    def inversion_steps(self, inversion: Inversion) -> int:
        """The step count a record was made with (one latent per time visited)."""
        return len(inversion.timesteps) - 1

    def decode_timesteps(self, model: LatentDiffusion, inversion: Inversion) -> list[int]:
        """The descending times a record decodes down (its own grid reversed)."""
        return list(reversed(inversion.timesteps))

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        """ValueError unless the record fits this method on `model`, beyond what every record must satisfy
        (`icd.editing.arguments.check_fits`: the model that made it, the latent shape, one latent per time)."""

    def decoder_eps(self, model: LatentDiffusion, *, guidance, tau: float | None, uncond=None) -> EpsFn:
        """The network that decodes (the UNet itself; `uncond`: a two-pass CFG's unconditional rows)."""
        return model.eps_fn(guidance=guidance, tau=tau, uncond=uncond)

    @torch.no_grad()
    def decode(self, host: Host, inversion: Inversion, st: Settings, *, should_stop: StopFn | None
               ) -> torch.Tensor:
        """Clean latents decoded from `inversion` with its own prompts (a reconstruction): `decoder_eps` at the
        run's guidance down `decode_timesteps` on `schedule`, stepped by `decode_path`."""
        model = self.model(host)
        cond = model.encode_prompt(inversion.prompts)
        eps = stoppable(self.decoder_eps(model, guidance=st.guidance, tau=st.tau), should_stop)
        return self.decode_path(eps, inversion.noise, cond, self.decode_timesteps(model, inversion),
                                schedule=self.schedule(model))

    def decode_path(self, eps: EpsFn, noise: torch.Tensor, cond: Cond, timesteps: list[int], *, schedule
                    ) -> torch.Tensor:
        """The sampling loop of `decode`, the hook a method with another solver overrides (FireFlow's midpoint
        path): the clean latents reached from `noise` down the descending `timesteps`. DDIM's jumps."""
        return ddim_loop(eps, noise, cond, timesteps, schedule=schedule).final

    # ------------------------------------------------------------------ editing
    def check_controls(self, controls):
        """The controls of an edit (None: the default Prompt-to-Prompt, or none without attention control);
        ValueError for ones it cannot take."""
        if controls is None:
            return EditControls() if self.attention_control else EditControls(p2p=None, masactrl=None)
        if not isinstance(controls, EditControls):
            raise TypeError(f"controls must be an EditControls for method {self.name}, got "
                            f"{type(controls).__name__}")
        if not self.attention_control and (controls.p2p is not None or controls.masactrl is not None):
            raise ValueError(f"{self.name} takes no attention control ({controls.control} given): pass "
                             "EditControls(p2p=None) (no Prompt-to-Prompt, local blend, mask or MasaCtrl)")
        return controls

    def controls(self, *, guidance: float | None = None, tau: float | None = None, p2p: P2PControls | None = None,
                 masactrl: MasaCtrlControls | None = None, **options: Any):
        """The controls of a request (CLI, web page, bench): guidance and tau, and the attention control where
        the method takes one. `options`: the method's own fields (`options`); None values are left out."""
        extra = sorted(k for k, v in options.items() if v is not None)
        if extra:
            raise ValueError(f"{', '.join(extra)} appl{'ies' if len(extra) == 1 else 'y'} to "
                             f"{' / '.join(REGISTRY.names(option=extra[0])) or 'no method'}, not {self.name}")
        if not self.attention_control:
            return EditControls(guidance=guidance, tau=tau, p2p=None, masactrl=None)
        return EditControls(guidance=guidance, tau=tau, p2p=p2p, masactrl=masactrl)

    def edit_eps(self, model: LatentDiffusion, inversion: Inversion, st: Settings, *, cond_src: Cond,
                 source_of: torch.Tensor, n_targets: int) -> EpsFn:
        """The network of an edit's batch [sources; targets]: two-pass CFG, each source row at its first
        target's code (the P2P convention guides both branches) against `uncond`'s rows."""
        s = len(cond_src)
        w = torch.full((n_targets,), float(st.guidance))
        first = torch.stack([w[(source_of == i).nonzero()[0, 0]] for i in range(s)])
        rows = torch.cat([torch.arange(s), source_of])
        return model.eps_fn(guidance=torch.cat([first, w]), tau=st.tau,
                            uncond=self.uncond(model, inversion, cond_src, rows))

    def uncond(self, model: LatentDiffusion, inversion: Inversion, cond_src: Cond, rows: torch.Tensor):
        """The unconditional rows of a two-pass edit: None, the empty prompt."""
        return None

    def edit_inputs(self, host: Host, inversion: Inversion, target_prompts, controls) -> EditInputs:
        """What every edit starts from: the checked controls, the model, the resolved settings, the flat targets
        with their source rows, and both prompts encoded once."""
        controls = self.check_controls(controls)
        model = self.model(host)
        st = self.settings(host, "edit", guidance=controls.guidance, tau=controls.tau,
                           steps=self.inversion_steps(inversion), strength=inversion.settings.get("strength"),
                           seed=inversion.settings.get("seed"))
        sources = list(inversion.prompts)
        targets, source_of = flatten_targets(target_prompts, len(sources))
        check_prompts(model, targets)
        cond = model.encode_prompt(sources + targets)  # one text-encoder call for the whole batch
        rows = torch.arange(len(sources) + len(targets))
        return EditInputs(controls, model, st, sources, targets, source_of, cond.index(rows[:len(sources)]),
                          cond.index(rows[len(sources):]))

    def edit(self, host: Host, inversion: Inversion, target_prompts, controls, *, should_stop: StopFn | None
             ) -> tuple[np.ndarray, np.ndarray, Settings]:
        """uint8 (edits [T, H, W, 3], reconstructions [S, H, W, 3], the settings it ran with): [sources, targets]
        decoded from `inversion` in one batch per step under `controls`' attention control."""
        controls, model, st, sources, targets, source_of, cond_src, cond_tgt = self.edit_inputs(
            host, inversion, target_prompts, controls)
        timesteps = self.decode_timesteps(model, inversion)
        layers = host.attention(model)
        controller = make_controller(model, layers, sources=sources, targets=targets, source_of=source_of,
                                     num_steps=len(timesteps) - 1, controls=controls,
                                     latent_shape=tuple(inversion.noise.shape[-2:]))
        eps = self.edit_eps(model, inversion, st, cond_src=cond_src, source_of=source_of, n_targets=len(targets))
        swap_tau = st.tau if controls.control == "swap" and self.attention_control else None
        z0 = edit_latents(stoppable(eps, should_stop), inversion.noise, cond_src, cond_tgt, model=model,
                          layers=layers, controller=controller, timesteps=timesteps, swap_tau=swap_tau,
                          schedule=self.schedule(model))
        images = to_uint8(model.decode_latents(z0))  # the loop raises NumericsError naming the step of a NaN/Inf
        control = controls.control if self.attention_control else "none"
        return images[len(sources):], images[:len(sources)], with_extra(st, control=control)

    # ------------------------------------------------------------------ generation
    def generate_latents(self, model: LatentDiffusion, eps: EpsFn, noise, cond: Cond, *, st: Settings
                         ) -> torch.Tensor:
        """Clean latents sampled with `eps` (`decoder_eps`) from `noise()`'s first draw
        (`icd.samplers.SeededNoise`): DDIM down the grid of `st.steps`."""
        schedule = self.schedule(model)
        return ddim_loop(eps, noise(), cond, generation_timesteps(st.steps, schedule), schedule=schedule).final


def with_extra(st: Settings, **extra) -> Settings:
    """`st` with more method-specific values in its `extra`."""
    return replace(st, extra={**st.extra, **extra})

