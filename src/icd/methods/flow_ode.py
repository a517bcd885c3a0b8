"""``flow-ode``: Euler inversion and decoding of the rectified-flow ODE dx/ds = v(x, s, c), the flow analogue of DDIM
inversion (docs/baselines.md §13), and what the flow methods share (§13-16: `FlowMethod`, the grid, the velocity
and the Euler step).

A flow model hands out its velocity as the project's `EpsFn`: eps_hat = x + (1 - s_t) v at the level s_t the network
read (`icd.models.flow`), so v = (eps_hat - x) / (1 - s_t) exactly (`icd.schedule.eps_to_velocity`). The times are
the schedule's integer grid (`DiscreteFlowSchedule.grid`, as ``ddim`` on a flow model uses): K steps visit
FluxPipeline's shifted sigmas linspace(1, 1/K, K) (exactly when K divides 1000, to the nearest integer time
otherwise) and the clean time 0 (s = 0).

- **Inversion** (0 -> s_1 -> ... -> s_K = 1 - 1e-5, unguided, the source prompt): plain forward Euler,
  x_{k+1} = x_k + (s_{k+1} - s_k) v(x_k, s_k), the velocity at the step's start and labelled with its start. That
  is DDIM's ``start`` rule; the ``reference`` rule (the noise labelled with the destination time, the P2P / NTI code's
  and diffusers' `DDIMInverseScheduler`'s) evaluates the network at a level the latent is not at, which is not an
  ODE step. The first step is written in the velocity form: the latent is clean (s = 0) while the network reads the
  grid's lowest level s_0 = shift(1/1000) (0.0016 for the embedded model: the integer times have no level 0); the
  DDIM jump of the same epsilon would scale that step's velocity by 1 - s_0.
- **Decoding and editing** (s_K -> ... -> 0): the DDIM jump of the epsilon on `DiscreteFlowSchedule`, which is the Euler
  step exactly when the start time is above 0 (always, going down): (1 - s') x0_hat + s' eps_hat = x + (s' - s) v.
  So decoding, editing, Prompt-to-Prompt, MasaCtrl and the prompt swap are `ddim`'s, unchanged.

Cost: K + K network calls (two-pass CFG is one batched call). Defaults: 50 + 50 (RF-Inversion's, FireFlow's and
RF-Solver's reference "ODE inversion" baseline on FLUX runs the same Euler loop at their step counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from icd.editing.inversion import Inversion
from icd.methods.base import Host, Settings
from icd.methods.ddim import DDIM
from icd.models.base import Cond, EpsFn, LatentDiffusion
from icd.schedule import DiscreteFlowSchedule, eps_to_velocity
from icd.solver import NumericsError


# ---------------------------------------------------------------------------------------------- flow helpers
class FlowMethod:
    """Mixin (before `Method` in the bases) of the methods that need a rectified-flow model: the model is checked
    wherever a method reaches it (`Method.model`: its entry's ``models=("flow",)``; invert, decode, edit, an
    inversion's check) and in `settings`."""

    max_steps = 500  # the grid's times stay distinct and above 0 (spacing 1000 / K >= 2)

    def settings(self, host: Host, task: str, **kwargs) -> Settings:
        self.model(host)
        steps = kwargs.get("steps")
        if steps is not None and not isinstance(steps, bool) and isinstance(steps, int) and steps > self.max_steps:
            raise ValueError(f"steps (--steps) of {self.name} must be an integer in 1..{self.max_steps}, got {steps}")
        return super().settings(host, task, **kwargs)

    def check_grid(self, model: LatentDiffusion, inversion: Inversion) -> None:
        """ValueError unless the record's times are the flow grid of its step count (ascending)."""
        times = [int(t) for t in inversion.timesteps]
        steps = len(times) - 1
        if not 1 <= steps <= self.max_steps or times != flow_times(model.schedule, steps):
            raise ValueError(f"this {inversion.method} inversion's times {times[:4]}... are not the flow grid of "
                             f"{steps} steps: invert again")


def flow_times(schedule: DiscreteFlowSchedule, steps: int) -> list[int]:
    """Inversion's ascending times 0 -> t_0 -> ... -> t_{K-1} = 999 (`DiscreteFlowSchedule.grid`; decoding walks
    them reversed)."""
    return [0, *schedule.grid(steps)]


def level(schedule: DiscreteFlowSchedule, t: int) -> float:
    """The latent's noise level at integer time t: s_t, and 0 at t = 0 (clean data)."""
    return float(schedule.alpha_sigma(int(t))[1])


def velocity(eps: EpsFn, x: torch.Tensor, t: int, cond: Cond, *, schedule: DiscreteFlowSchedule) -> torch.Tensor:
    """The flow model's velocity v(x, s_t, c) [float64] from one `eps` call at integer time t (the network reads s_t,
    `DiscreteFlowSchedule.noise_level`, also at t = 0)."""
    return eps_to_velocity(x, eps(x, int(t), cond), schedule.noise_level(int(t)))


def euler(x: torch.Tensor, v: torch.Tensor, s_from: float, s_to: float) -> torch.Tensor:
    """x + (s_to - s_from) v in v's precision (float64 for a flow model), returned in x's dtype."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, v.dtype), torch.float32)
    return (x.to(dtype) + (s_to - s_from) * v.to(dtype)).to(x.dtype)


def check_finite(x: torch.Tensor, method: str, i: int, *, t_from: int, t_to: int) -> None:
    """NumericsError naming the step and the batch rows of NaN / Inf latents."""
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    if bool(bad.any()):
        raise NumericsError(f"{method}: NaN/Inf latents at step {i} (t = {t_from} -> {t_to}) in batch rows "
                            f"{bad.nonzero().flatten().tolist()}")


def euler_path(eps: EpsFn, x: torch.Tensor, cond: Cond, times: Sequence[int], *, schedule: DiscreteFlowSchedule,
               method: str, field: Callable[[int, torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None
               ) -> list[torch.Tensor]:
    """Forward Euler along `times` (either direction): every latent visited, the start included. `field(i, x, v, s)`
    may replace the model's velocity v at step i (RF-Inversion's controlled fields). The latents are kept in the
    default memory format (a fresh VAE encoding may be channels-last; a saved record must decode bit-identically)."""
    x = x.contiguous()
    visited = [x]
    for i, (t_a, t_b) in enumerate(zip(times, times[1:])):
        s_a, s_b = level(schedule, t_a), level(schedule, t_b)
        v = velocity(eps, x, t_a, cond, schedule=schedule)
        if field is not None:
            v = field(i, x, v, s_a)
        x = euler(x, v, s_a, s_b).contiguous()
        check_finite(x, method, i, t_from=t_a, t_to=t_b)
        visited.append(x)
    return visited


# ---------------------------------------------------------------------------------------------- flow-ode
class FlowODE(FlowMethod, DDIM):
    """`Method.invert`'s preamble (unguided, the source prompt, up the flow grid of `st.steps`: the schedule's
    `inversion_timesteps` are `flow_times`) with forward Euler as its loop (`ddim_rule` does not apply: the
    flow-correct rule is the step's start); decoding is DDIM's, the Euler step going down (module docstring)."""

    solver = "euler"  # what the record keeps as its path (`path_settings`)

    def invert_path(self, eps: EpsFn, z0: torch.Tensor, cond: Cond, timesteps: list[int], *, schedule,
                    ddim_rule: str) -> list[torch.Tensor]:
        return euler_path(eps, z0, cond, timesteps, schedule=schedule, method=self.name)

    def path_settings(self, ddim_rule: str) -> dict:
        return {"solver": self.solver}

    def check_inversion(self, model: LatentDiffusion, inversion: Inversion) -> None:
        self.check_grid(model, inversion)
        super().check_inversion(model, inversion)
