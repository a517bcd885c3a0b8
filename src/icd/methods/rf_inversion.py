"""``rf-inversion``: RF-Inversion (Rout et al., ICLR 2025, "Semantic Image Inversion and Editing using Rectified
Stochastic Differential Equations", arXiv 2410.10792; docs/baselines.md §14): inversion and editing by two
controlled ODEs, no attention control.

In the flow convention of `icd.models.flow` (level s, s = 1 noise, dx/ds = v), on the schedule's grid
(`DiscreteFlowSchedule.grid`, FluxPipeline's sigmas to the nearest integer time):

- **Controlled forward ODE** (Algorithm 1, eq. 8), from the clean latent y_0 = z0 at s = 0 up to s = 1 - 1e-5, towards
  one fixed noise sample y_1 ~ N(0, I) (seeded):
  u_hat = u(Y, s) + gamma ((y_1 - Y) / (1 - s) - u(Y, s)),  Y <- Y + (s' - s) u_hat,
  u the model's velocity on the empty prompt, unguided (the reference's ``source_prompt=""``, guidance 0).
- **Controlled reverse ODE** (Algorithm 2, eq. 15/17), from Y_1 down to s = 0, towards the source latent y_0:
  v_hat = v(X, s, c) + eta_k ((X - y_0) / s - v(X, s, c)),  X <- X + (s' - s) v_hat,
  v the guided velocity with the prompt c (the source prompt decodes, the targets edit), eta_k = eta on the steps
  k with int(start K) <= k < min(int(stop K), K) (counted from the noise) and 0 on the others.

In the reference's "time" t = 1 - s these are u_t = v(., 1 - t), the conditional fields (y_1 - Y_t) / (1 - t) and
(y_0 - X_t) / (1 - t) and the same Euler steps. gamma = eta = 0 is ``flow-ode`` (with its source-prompt inversion:
``RFInversion(source_prompt=True)``; tested).

Defaults, the authors' (LituRout/RF-Inversion ``gradio_demo_rfinversion.py``: 28 steps, gamma 0.5, eta 0.9, start
index 0, stop index 7 of 28) and diffusers' community ``pipeline_flux_rf_inversion.py`` (``invert(gamma=0.5,
num_inversion_steps=28)``, ``__call__(start_timestep=0, stop_timestep=0.25, num_inference_steps=28)``: int(0.25 * 28)
= 7). The target guidance is the project's edit default (the reference's is FLUX-dev's embedded scale: 3.5 in
diffusers, 1.0 in the authors' demo). Cost: K + K calls (28 + 28).

What differs from the reference: its forward loop labels step i with t_i = i / (K + 1) while stepping the reversed
shifted grid (so the level the network reads is not the latent's); here the network reads the latent's level on the
same grid the reverse ODE walks, so gamma = 0 is exact Euler inversion. The top level is 1 - 1e-5, not 1. The
record keeps y_0 (its first latent) and the seed of y_1.
"""

from __future__ import annotations

import torch

from icd.editing.inversion import Inversion
from icd.imageio import to_uint8
from icd.methods.base import Host, Method, Settings, with_extra
from icd.methods.flow_ode import FlowMethod, euler_path, flow_times
from icd.models.base import Cond, EpsFn, LatentDiffusion
from icd.samplers import StopFn, initial_noise, stoppable

DEFAULTS = dict(gamma=0.5, eta=0.9, start=0.0, stop=0.25, source_prompt=False)


class RFInversion(FlowMethod, Method):
    default_steps = 28
    gamma = DEFAULTS["gamma"]  # the forward ODE's controller guidance
    eta = DEFAULTS["eta"]  # the reverse ODE's controller guidance
    start = DEFAULTS["start"]  # eta's first step, as a fraction of the steps (int(start K))
    stop = DEFAULTS["stop"]  # eta's end (exclusive), as a fraction of the steps (int(stop K): 7 of 28)
    source_prompt = DEFAULTS["source_prompt"]  # False: invert on the empty prompt (the reference); True: the source's

    OPTIONS = tuple(DEFAULTS)

    def __init__(self, **options):
        """Override the reference's defaults for one object (tests, ablations): any of `OPTIONS`."""
        for key, value in options.items():
            if key not in self.OPTIONS:
                raise TypeError(f"RFInversion: unknown option {key!r}; choose from {', '.join(self.OPTIONS)}")
            setattr(self, key, value)
        if not 0.0 <= self.start <= self.stop <= 1.0:
            raise ValueError(f"RFInversion: need 0 <= start <= stop <= 1, got {self.start}, {self.stop}")

    # ------------------------------------------------------------------ inversion: the controlled forward ODE
    def invert(self, host: Host, model: LatentDiffusion, z0: torch.Tensor, prompts: list[str], *, st: Settings,
               guidance: float | None, ddim_rule: str, progress: bool, should_stop: StopFn | None) -> Inversion:
        seed = 0 if st.seed is None else int(st.seed)
        y1 = initial_noise(z0.shape[1:], [seed] * z0.shape[0], z0.device).to(torch.float64)
        cond = model.encode_prompt(prompts) if self.source_prompt else model.empty_cond(len(prompts))
        gamma = float(self.gamma)

        def controlled(i: int, x: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
            return u if gamma == 0 else u + gamma * ((y1 - x.to(u.dtype)) / (1.0 - s) - u)

        with torch.no_grad():
            latents = euler_path(stoppable(self.encoder_eps(model), should_stop), z0, cond,
                                 flow_times(model.schedule, st.steps), schedule=model.schedule, method=self.name,
                                 field=controlled)
        return Inversion(latents=latents, timesteps=flow_times(model.schedule, st.steps), prompts=prompts,
                         method=self.name,
                         settings={"seed": st.seed, "gamma": gamma,
                                   "inversion_prompt": "source" if self.source_prompt else "empty"})

    def inversion_key(self, *, seed: int, guidance: float | None) -> tuple:
        return (seed, self.gamma, self.source_prompt)  # y_1 and the forward field

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        self.check_grid(model, inversion)
        super().check_inversion(model, inversion)

    # ------------------------------------------------------------------ decoding: the controlled reverse ODE
    def eta_steps(self, steps: int) -> tuple[int, int]:
        """The reverse steps [first, end) that take eta (the reference's int(start K), min(int(stop K), K))."""
        return int(self.start * steps), min(int(self.stop * steps), steps)

    def reverse(self, eps: EpsFn, x: torch.Tensor, y0: torch.Tensor, cond: Cond, *, times: list[int],
                model: LatentDiffusion) -> torch.Tensor:
        """The controlled reverse ODE from `x` down `times` towards `y0` (one row each)."""
        first, end = self.eta_steps(len(times) - 1)
        eta, target = float(self.eta), y0.to(torch.float64)

        def controlled(i: int, x: torch.Tensor, v: torch.Tensor, s: float) -> torch.Tensor:
            if not (first <= i < end) or eta == 0:
                return v
            return v + eta * ((x.to(v.dtype) - target) / s - v)

        with torch.no_grad():
            return euler_path(eps, x, cond, times, schedule=model.schedule, method=self.name, field=controlled)[-1]

    def decode(self, host: Host, inversion: Inversion, st: Settings, *, should_stop: StopFn | None
               ) -> torch.Tensor:
        model = self.model(host)
        cond = model.encode_prompt(inversion.prompts)
        eps = stoppable(self.decoder_eps(model, guidance=st.guidance, tau=st.tau), should_stop)
        return self.reverse(eps, inversion.noise, inversion.latents[0], cond,
                            times=self.decode_timesteps(model, inversion), model=model)

    def run_settings(self, st: Settings, inversion: Inversion) -> Settings:
        return self.with_controls(super().run_settings(st, inversion), len(inversion.timesteps) - 1)

    def with_controls(self, st: Settings, steps: int) -> Settings:
        first, end = self.eta_steps(steps)
        return with_extra(st, eta=float(self.eta), eta_steps=[first, end])

    # ------------------------------------------------------------------ editing
    def edit(self, host: Host, inversion: Inversion, target_prompts, controls, *, should_stop: StopFn | None):
        """[sources, targets] down the controlled reverse ODE in one batch per step, each row towards its source's
        y_0; the source rows are the reconstructions."""
        _, model, st, sources, targets, source_of, cond_src, cond_tgt = self.edit_inputs(
            host, inversion, target_prompts, controls)
        eps = self.edit_eps(model, inversion, st, cond_src=cond_src, source_of=source_of, n_targets=len(targets))
        rows = torch.cat([torch.arange(len(sources)), source_of]).to(inversion.noise.device)
        z0 = self.reverse(stoppable(eps, should_stop), inversion.noise[rows].contiguous(),
                          inversion.latents[0][rows], Cond.cat([cond_src, cond_tgt]),
                          times=self.decode_timesteps(model, inversion), model=model)
        images = to_uint8(model.decode_latents(z0))
        st = with_extra(st, control="none", gamma=inversion.settings.get("gamma"))
        return images[len(sources):], images[:len(sources)], self.with_controls(st, self.inversion_steps(inversion))
