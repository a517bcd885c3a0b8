"""``flowedit``: FlowEdit (Kulikov et al. 2024, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow
Models", arXiv 2412.08629; docs/baselines.md §15): no inversion, no attention control. An ODE is integrated directly
from the source latent to the edit, driven by the difference of the target's and the source's velocities at noised
copies of the source:

    at each step k from n_max steps before the end to n_min steps before it (levels s_k > s_{k+1} of K):
      Z_src = (1 - s_k) z_src + s_k n,  n ~ N(0, I) fresh each step (and each of the n_avg draws),
      Z_tar = Z_edit + Z_src - z_src,
      Z_edit <- Z_edit + (s_{k+1} - s_k) mean_n [ v(Z_tar, s_k, c_tar; w_tar) - v(Z_src, s_k, c_src; w_src) ],
    starting from Z_edit = z_src; the last n_min steps (0 by default) sample the target from
    X = Z_edit + Z_src - z_src plainly (SDEdit-style).

It follows SDEdit's pattern (`icd.methods.sdedit`): "inversion" only VAE-encodes the source (0 calls) into a record
(its latent at time 0, the step count and the noise seed) and the edit works from that record; the reconstructions it
returns are the VAE round trip. The source and target rows of a step are one batched call (two-pass CFG: 4 rows per
image), as the reference's SD3 code batches them.

Defaults, the reference's for FLUX (fallenshock/FlowEdit ``FLUX_exp.yaml`` and ``FlowEditFLUX``'s signature): 28
steps, n_max 24, n_min 0, n_avg 1, source guidance 1.5, target guidance 5.5 (codes w = 0.5 and 4.5 here: two-pass CFG
on the embedded teacher, FLUX-dev's embedded scale on a guidance-distilled FLUX). n_max and n_min are counts at the
reference's 28 steps; another step count K keeps their fractions (round(24 K / 28)). Cost: n_avg (n_max - n_min) +
n_min calls (24).
"""

from __future__ import annotations

import torch

from icd.editing.edit import flatten_targets
from icd.editing.inversion import Inversion
from icd.imageio import to_uint8
from icd.methods.base import Host, Method, Settings, with_extra
from icd.methods.flow_ode import FlowMethod, check_finite, euler, flow_times, level, velocity
from icd.models.base import Cond, LatentDiffusion, check_prompts
from icd.samplers import SeededNoise, StopFn, stoppable

DEFAULTS = dict(n_max=24, n_min=0, n_avg=1, source_guidance=0.5, target_guidance=4.5)
REFERENCE_STEPS = 28  # the step count n_max / n_min are given for


class FlowEdit(FlowMethod, Method):
    default_steps = REFERENCE_STEPS
    bench_guidance = False  # a benchmark runs it at the reference's two scales, not the run's code
    n_max = DEFAULTS["n_max"]
    n_min = DEFAULTS["n_min"]
    n_avg = DEFAULTS["n_avg"]
    source_guidance = DEFAULTS["source_guidance"]  # code w of the source velocity (CFG 1.5)
    target_guidance = DEFAULTS["target_guidance"]  # the edit's default code (CFG 5.5); EditControls.guidance overrides

    OPTIONS = tuple(DEFAULTS)

    def __init__(self, **options):
        """Override the reference's defaults for one object (tests, ablations): any of `OPTIONS`."""
        for key, value in options.items():
            if key not in self.OPTIONS:
                raise TypeError(f"FlowEdit: unknown option {key!r}; choose from {', '.join(self.OPTIONS)}")
            setattr(self, key, value)
        if not (0 <= self.n_min <= self.n_max <= REFERENCE_STEPS and self.n_avg >= 1):
            raise ValueError(f"FlowEdit: need 0 <= n_min <= n_max <= {REFERENCE_STEPS} and n_avg >= 1")

    def guidance_default(self, host: Host, task: str) -> float:
        return self.target_guidance if task == "edit" else super().guidance_default(host, task)

    def window(self, steps: int) -> tuple[int, int]:
        """(n_max, n_min) at `steps` steps: the reference's counts at 28, their fractions elsewhere."""
        scale = steps / REFERENCE_STEPS
        n_max = min(steps, int(self.n_max * scale + 0.5))
        return n_max, min(n_max, int(self.n_min * scale + 0.5))

    def calls(self, steps: int) -> int:
        """Network calls of one edit at `steps` steps."""
        n_max, n_min = self.window(steps)
        return self.n_avg * (n_max - n_min) + n_min

    # ------------------------------------------------------------------ the record (no network call)
    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        return Inversion(latents=[z0], timesteps=[0], prompts=prompts, method=self.name,
                         settings={"seed": st.seed, "steps": st.steps})

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (seed,)  # the noise draws

    def inversion_steps(self, inversion: Inversion) -> int:
        return inversion.settings.get("steps")

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        steps = inversion.settings.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= self.max_steps:
            raise ValueError(f"this FlowEdit record has no valid step count ({steps!r})")
        if list(inversion.timesteps) != [0]:
            raise ValueError(f"this FlowEdit record's times are {list(inversion.timesteps)}, not [0] (the source "
                             "latent alone): encode the image again")
        super().check_inversion(model, inversion)

    def decode(self, host: Host, inversion: Inversion, st: Settings, *, should_stop: StopFn | None
               ) -> torch.Tensor:
        """No sampler runs for the source: the record's latent."""
        return inversion.latents[0]

    # ------------------------------------------------------------------ the edit
    def edit(self, host: Host, inversion: Inversion, target_prompts, controls, *, should_stop: StopFn | None):
        controls = self.check_controls(controls)
        model = self.model(host)
        steps = self.inversion_steps(inversion)
        st = self.settings(host, "edit", guidance=controls.guidance, tau=controls.tau, steps=steps,
                           seed=inversion.settings.get("seed"))
        sources = list(inversion.prompts)
        targets, source_of = flatten_targets(target_prompts, len(sources))
        check_prompts(model, targets)
        z_src = inversion.latents[0].contiguous()  # a fresh encoding may be channels-last, a loaded one is not
        z = self.flowedit(model, z_src, sources=sources, targets=targets, source_of=source_of, st=st,
                          should_stop=should_stop)
        images = to_uint8(model.decode_latents(z))
        recon = to_uint8(model.decode_latents(z_src))
        n_max, n_min = self.window(steps)
        st = with_extra(st, control="none", source_guidance=float(self.source_guidance), n_max=n_max, n_min=n_min,
                        n_avg=int(self.n_avg))
        return images, recon, st

    @torch.no_grad()
    def flowedit(self, model: LatentDiffusion, z_src: torch.Tensor, *, sources: list[str], targets: list[str],
                 source_of: torch.Tensor, st: Settings, should_stop: StopFn | None) -> torch.Tensor:
        """The edited latents [T] (module docstring)."""
        s_n, t_n = len(sources), len(targets)
        device = z_src.device
        source_of = source_of.to(device)
        cond_src, cond_tgt = model.encode_prompt(sources), model.encode_prompt(targets)
        both = Cond.cat([cond_src, cond_tgt])
        codes = torch.cat([torch.full((s_n,), float(self.source_guidance)), torch.full((t_n,), float(st.guidance))])
        eps_both = stoppable(model.eps_fn(guidance=codes, tau=st.tau), should_stop)
        eps_tgt = stoppable(model.eps_fn(guidance=float(st.guidance), tau=st.tau), should_stop)
        seed = 0 if st.seed is None else int(st.seed)
        noise = SeededNoise(z_src.shape[1:], [seed] * s_n, device)  # fresh draws, one generator per image
        schedule = model.schedule
        times = list(reversed(flow_times(schedule, st.steps)))  # t_0 = 999 > ... > t_{K-1} > 0
        steps = len(times) - 1
        n_max, n_min = self.window(steps)
        x_src = z_src.to(torch.float64)
        z_edit = x_src[source_of]
        x_tar = None
        for k in range(steps - n_max, steps):
            t_a, t_b = times[k], times[k + 1]
            s_a, s_b = level(schedule, t_a), level(schedule, t_b)
            if k < steps - n_min:  # the inversion-free ODE
                delta = torch.zeros_like(z_edit)
                for _ in range(int(self.n_avg)):
                    zt_src = schedule.add_noise(x_src, noise().to(torch.float64), t_a)
                    zt_tar = z_edit + (zt_src - x_src)[source_of]
                    x = torch.cat([zt_src, zt_tar]).to(z_src.dtype).contiguous()
                    v = velocity(eps_both, x, t_a, both, schedule=schedule)
                    delta += (v[s_n:] - v[:s_n][source_of]) / self.n_avg
                z_edit = euler(z_edit, delta, s_a, s_b)
                check_finite(z_edit, self.name, k, t_from=t_a, t_to=t_b)
            else:  # the last n_min steps: plain sampling of the target
                if x_tar is None:
                    xt_src = schedule.add_noise(x_src, noise().to(torch.float64), t_a)
                    x_tar = (z_edit + (xt_src - x_src)[source_of]).to(z_src.dtype)
                v = velocity(eps_tgt, x_tar, t_a, cond_tgt, schedule=schedule)
                x_tar = euler(x_tar, v, s_a, s_b)
                check_finite(x_tar, self.name, k, t_from=t_a, t_to=t_b)
        out = z_edit if x_tar is None else x_tar
        return out.to(z_src.dtype).contiguous()
