"""``fireflow``: FireFlow (Deng et al. 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing",
arXiv 2412.07517; docs/baselines.md §16): a midpoint solver of the flow ODE dx/ds = v that reuses the previous step's
midpoint velocity as the next step's first stage, so it costs one network call per step (K + 1 for K steps), for
both inversion (0 -> 1 - 1e-5, unguided, the source prompt) and decoding / editing (-> 0):

    v_0 = v(x_0, s_0)  (step 0 only),   v_k = m_{k-1}  (k > 0: the reuse),
    x_mid = x_k + (s_mid - s_k) v_k,    m_k = v(x_mid, s_mid),
    x_{k+1} = x_k + h [(1 - 1/(2c)) v_k + 1/(2c) m_k],   h = s_{k+1} - s_k,  c = (s_mid - s_k) / h.

The reference (``denoise_fireflow`` in the authors' ``src/flux/sampling.py``) evaluates at the exact midpoint level
s_mid = s_k + h / 2, where c = 1/2 and the update is its x_{k+1} = x_k + h m_k. The network here reads integer times
(`icd.schedule.DiscreteFlowSchedule`), so s_mid is the level of the integer time nearest the midpoint (|c - 1/2| <=
~0.01 at 8 steps on the embedded model), and the weights above keep the step second-order for that c (the two-stage
Runge-Kutta family; at c = 1/2 they are the reference's update exactly).

Defaults, the authors' README ("Edit your own image": ``--num_steps 8 --inject 1 --guidance 2 --sampling_strategy
fireflow``; inversion at guidance 1, i.e. unguided on FLUX-dev): 8 + 8 steps, 9 + 9 calls. The guidance is the project's
edit default (the reference's 2 is FLUX-dev's embedded scale). Attention control: the reference replaces the target's
self-attention values with the source's in the first step of all blocks (``--inject 1``, ``replace_v``); here, as
for ``ddim``, Prompt-to-Prompt by default (or MasaCtrl, or a prompt swap): `EditControls`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from icd.editing.attention import controlled
from icd.editing.edit import make_controller
from icd.editing.inversion import Inversion
from icd.imageio import to_uint8
from icd.methods.base import Host, with_extra
from icd.methods.flow_ode import FlowODE, check_finite, level, velocity
from icd.models.base import Cond, EpsFn
from icd.samplers import StopFn, stoppable
from icd.schedule import DiscreteFlowSchedule


def midpoint_time(schedule: DiscreteFlowSchedule, t_a: int, t_b: int) -> int:
    """The integer time strictly between `t_a` and `t_b` (neither 0) whose level is nearest the midpoint of the two
    latents' levels (ties: the lower time)."""
    lo, hi = sorted((int(t_a), int(t_b)))
    if hi - lo < 2:
        raise ValueError(f"no integer time between {t_a} and {t_b} for FireFlow's midpoint: take fewer steps")
    target = 0.5 * (level(schedule, t_a) + level(schedule, t_b))
    sig = schedule.sigmas
    k = int(torch.searchsorted(sig, torch.tensor(target, dtype=sig.dtype)))
    candidates = {min(max(j, lo + 1), hi - 1) for j in (k - 1, k)}
    return min(candidates, key=lambda j: (abs(float(sig[j]) - target), j))


def fireflow_path(eps: EpsFn, x: torch.Tensor, cond: Cond, times: Sequence[int], *, schedule: DiscreteFlowSchedule,
                  method: str, begin: Callable[[int, int], None] | None = None,
                  after: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """FireFlow along `times` (either direction; module docstring): every latent visited, the start included.
    `begin(i, t)` is called before each network call of step i at time t (an attention controller's clock);
    `after(x)` may replace each step's landing (local blend)."""
    x = x.contiguous()  # the default memory format, as `euler_path`
    visited, reused = [x], None
    for i, (t_a, t_b) in enumerate(zip(times, times[1:])):
        s_a, s_b = level(schedule, t_a), level(schedule, t_b)
        t_m = midpoint_time(schedule, t_a, t_b)
        s_m = float(schedule.noise_level(t_m))
        if reused is None:
            if begin is not None:
                begin(i, int(t_a))
            reused = velocity(eps, x, t_a, cond, schedule=schedule)
        h = s_b - s_a
        c = (s_m - s_a) / h
        x_mid = (x.to(reused.dtype) + (s_m - s_a) * reused).to(x.dtype)
        if begin is not None:
            begin(i, t_m)
        v_mid = velocity(eps, x_mid, t_m, cond, schedule=schedule)
        x = (x.to(v_mid.dtype) + h * ((1.0 - 0.5 / c) * reused + (0.5 / c) * v_mid)).to(x.dtype).contiguous()
        check_finite(x, method, i, t_from=int(t_a), t_to=int(t_b))
        if after is not None:
            x = after(x)
        reused = v_mid
        visited.append(x)
    return visited


class FireFlow(FlowODE):
    """`FlowODE` with FireFlow's midpoint solver as the loop of inversion, decoding and editing."""

    solver = "fireflow"  # what the record keeps as its path
    default_steps = 8
    max_steps = 250  # a midpoint needs an integer time strictly inside every step (the last ends at 0)

    def calls(self, steps: int) -> int:
        """Network calls of one inversion or one decoding of `steps` steps."""
        return steps + 1

    def invert_path(self, eps: EpsFn, z0: torch.Tensor, cond: Cond, timesteps: list[int], *, schedule,
                    ddim_rule: str) -> list[torch.Tensor]:
        return fireflow_path(eps, z0, cond, timesteps, schedule=schedule, method=self.name)

    def decode_path(self, eps: EpsFn, noise: torch.Tensor, cond: Cond, timesteps: list[int], *, schedule
                    ) -> torch.Tensor:
        return fireflow_path(eps, noise, cond, timesteps, schedule=schedule, method=self.name)[-1]

    @torch.no_grad()
    def edit(self, host: Host, inversion: Inversion, target_prompts, controls, *, should_stop: StopFn | None):
        """`Method.edit` with FireFlow's solver in place of the DDIM loop: [sources, targets] in one batch per call
        under the attention controller (its step clock advances per solver step, both calls of step 0 and each
        midpoint call reading their own time)."""
        controls, model, st, sources, targets, source_of, cond_src, cond_tgt = self.edit_inputs(
            host, inversion, target_prompts, controls)
        timesteps = self.decode_timesteps(model, inversion)
        layers = host.attention(model)
        controller = make_controller(model, layers, sources=sources, targets=targets, source_of=source_of,
                                     num_steps=len(timesteps) - 1, controls=controls,
                                     latent_shape=tuple(inversion.noise.shape[-2:]))
        eps = stoppable(self.edit_eps(model, inversion, st, cond_src=cond_src, source_of=source_of,
                                      n_targets=len(targets)), should_stop)
        cond = Cond.cat([cond_src, cond_tgt])
        swap_tau = st.tau if controls.control == "swap" else None
        # prompt swap: target rows read their source's token embeddings while t / 1000 > tau (as `edit_latents`)
        swapped = Cond.cat([cond_src, replace(cond_tgt, tokens=cond_src.tokens[source_of])])

        def step(x: torch.Tensor, t, c: Cond) -> torch.Tensor:
            return eps(x, t, swapped if swap_tau is not None and int(t) / 1000.0 > swap_tau else c)

        noise = inversion.noise.contiguous()
        x = torch.cat([noise, noise[source_of]]).contiguous()
        if hasattr(controller, "prepare"):
            controller.prepare(x.device, model.dtype)  # as `edit_latents`: index tensors built before the loop
        with controlled(model.unet, controller, layers):
            z0 = fireflow_path(step, x, cond, timesteps, schedule=model.schedule, method=self.name,
                               begin=controller.begin_step, after=controller.on_latents)[-1]
        images = to_uint8(model.decode_latents(z0))
        return images[len(sources):], images[:len(sources)], with_extra(st, control=controls.control)
