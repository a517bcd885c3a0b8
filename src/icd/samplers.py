"""Every sampler: loops of `ddim_jump` over explicit integer timestep lists, each taking an `EpsFn`
``eps(x_t, t, cond)`` (docs/method.md §2, §4, §8; docs/baselines.md §2).

A descending list samples (noise -> data), an ascending list inverts (data -> noise); the noise is evaluated at
the step's starting latent (labelled with its time, except in DDIM inversion's reference rule: `DDIM_RULES`).
Which network, adapter, guidance and dynamic-CFG threshold a loop runs is decided by the `EpsFn` it is handed
(`LatentDiffusion.eps_fn`), never by the loop.

- `ddim_loop` -> `DDIMRun` (the final latent and every visited one).
- `ddim_invert` / `ddim_decode`: DDIM inversion up the DDIM grid from z0 at t = 0, and decoding back down it.
  Inversion takes one of two rules for the timestep label of the noise prediction on the step t -> t':
  ``reference`` (the default) labels it t' (the destination), as the Prompt-to-Prompt / null-text inversion
  reference code and diffusers' `DDIMInverseScheduler` do; ``start`` labels it t (the latent's own time, how iCD's
  forward teacher steps; docs/baselines.md §2 gives the measured difference).
- `icd_invert` (docs/method.md §8.1): noise z0 to the first forward boundary with explicit noise, then one forward
  jump per segment up to T - 1. `icd_decode`: one reverse jump per segment down to 0, optionally re-noised
  (`renoise` = gamma, generation only; `icd.solver.renoised_jump`).
- `SeededNoise`: per-row seeded N(0, I) draws, so a row never depends on the batch it runs in.
- `stoppable` / `Cancelled`: a caller's ``should_stop()`` asked before each network call of a loop (a web request
  whose client has gone); True raises `Cancelled` before that step runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from icd.boundaries import Boundaries
from icd.models.base import Cond, EpsFn
from icd.schedule import NoiseSchedule, ddim_grid
from icd.solver import NumericsError, ddim_jump, renoised_jump

Callback = Callable[[int, int, int, torch.Tensor], "torch.Tensor | None"]  # (i, t_from, t_to, x_to) -> x or None


StopFn = Callable[[], bool]  # asked once per sampling step; True cancels the run


class Cancelled(Exception):  # noqa: N818 (the name says what happened, as asyncio's CancelledError)
    """A run stopped because its ``should_stop()`` returned True (raised before the step it would have run)."""


def stoppable(eps: EpsFn, should_stop: StopFn | None) -> EpsFn:
    """`eps` asking `should_stop()` before each call (one call per sampling step: a plain Python call, no device
    sync) and raising `Cancelled` when it returns True; `eps` itself when `should_stop` is None. The values it
    returns are `eps`'s own, so a run that is not stopped computes exactly what it would without the hook."""
    if should_stop is None:
        return eps

    def checked(x: torch.Tensor, t, cond: Cond) -> torch.Tensor:
        if should_stop():
            raise Cancelled("cancelled: should_stop() returned True")
        return eps(x, t, cond)

    return checked


class DDIMRun(NamedTuple):
    """What `ddim_loop` returns: the final latent and every latent it visited (the start included)."""

    final: torch.Tensor
    visited: list[torch.Tensor]


DDIM_RULES = ("start", "reference")  # DDIM inversion: the noise labelled with the step's start or its destination


def ddim_loop(eps: EpsFn, x: torch.Tensor, cond: Cond, timesteps: Sequence[int], *, schedule: NoiseSchedule,
              callback: Callback | None = None, label: str = "start") -> DDIMRun:
    """DDIM jumps timesteps[0] -> timesteps[1] -> ..., eps evaluated at each starting latent, with the timestep
    label of the start (``label="start"``) or of the destination (``"reference"``: DDIM inversion's reference rule).

    `callback(i, t_from, t_to, x_to)` may return a replacement latent (editors' local blend). Returns a `DDIMRun`:
    the final latent and every visited latent (the start included). Raises `NumericsError` naming the step of a
    NaN / Inf.
    """
    if label not in DDIM_RULES:
        raise ValueError(f"unknown DDIM rule {label!r}; choose from {', '.join(DDIM_RULES)}")
    visited, jumped = [x], []
    finite = None  # a device flag: one host read after the loop, not one per step
    for i, (t_from, t_to) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_eps = int(t_from) if label == "start" else int(t_to)
        x = ddim_jump(x, eps(x, t_eps, cond), int(t_from), int(t_to), schedule=schedule)
        ok = torch.isfinite(x).all()
        finite = ok if finite is None else finite & ok
        jumped.append(x)
        if callback is not None:
            replaced = callback(i, int(t_from), int(t_to), x)
            x = x if replaced is None else replaced
        visited.append(x)
    if finite is not None and not bool(finite):
        _raise_first_nonfinite(jumped, timesteps)
    return DDIMRun(x, visited)


def _raise_first_nonfinite(jumped: list[torch.Tensor], timesteps: Sequence[int]) -> None:
    """NumericsError naming the first step whose jump gave NaN / Inf latents, and its batch rows."""
    for i, x in enumerate(jumped):
        bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten().tolist()
            raise NumericsError(f"NaN/Inf latents at step {i} (t = {timesteps[i]} -> {timesteps[i + 1]}) in batch "
                                f"rows {rows}")


def inversion_timesteps(steps: int, schedule: NoiseSchedule | None = None) -> list[int]:
    """DDIM inversion's grid 0 -> g_0 -> ... -> g_{n-1} (n = `steps` UNet calls; g: `schedule.grid`, default DDIM's)."""
    return [0, *(ddim_grid(steps) if schedule is None else schedule.grid(steps))]


def generation_timesteps(steps: int, schedule: NoiseSchedule | None = None) -> list[int]:
    """DDIM sampling's grid g_{n-1} -> ... -> g_0 -> 0 (g: `schedule.grid`, default DDIM's)."""
    return [*reversed(ddim_grid(steps) if schedule is None else schedule.grid(steps)), 0]


@torch.no_grad()
def ddim_invert(eps: EpsFn, z0: torch.Tensor, cond: Cond, *, steps: int, schedule: NoiseSchedule,
                rule: str = "reference") -> tuple[list[int], list[torch.Tensor]]:
    """Deterministic DDIM inversion from clean latents (run it unguided): (timesteps, visited latents). `rule`: the
    noise's timestep label on each step (`DDIM_RULES`; module docstring)."""
    timesteps = inversion_timesteps(steps, schedule)
    return timesteps, ddim_loop(eps, z0, cond, timesteps, schedule=schedule, label=rule).visited


@torch.no_grad()
def ddim_decode(eps: EpsFn, noise: torch.Tensor, cond: Cond, timesteps: Sequence[int], *,
                schedule: NoiseSchedule) -> torch.Tensor:
    """DDIM from an inversion's noise back down its own (ascending) grid to t = 0: clean latents."""
    return ddim_loop(eps, noise, cond, list(reversed(timesteps)), schedule=schedule).final


@torch.no_grad()
def icd_invert(eps_forward: EpsFn, z0: torch.Tensor, cond: Cond, boundaries: Boundaries, *,
               schedule: NoiseSchedule, noise: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    """Forward-model encoding (docs/method.md §8.1): x_start = alpha z0 + sigma noise at the first forward time,
    then one forward jump per segment. Run `eps_forward` unguided. Returns (timesteps, visited latents)."""
    timesteps = boundaries.forward_schedule()
    x_start = schedule.add_noise(z0, noise.to(z0.dtype), timesteps[0])
    return timesteps, ddim_loop(eps_forward, x_start, cond, timesteps, schedule=schedule).visited


@torch.no_grad()
def icd_decode(eps_reverse: EpsFn, noise: torch.Tensor, cond: Cond, boundaries: Boundaries, *,
               schedule: NoiseSchedule, renoise: float = 0.0,
               fresh_noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Reverse-model decoding T-1 -> E_R[-1] -> ... -> 0: clean latents.

    `renoise` = gamma > 0 (generation only) re-noises each intermediate landing with `fresh_noise()`; 0 is the
    paper's deterministic jumps, which inversion needs.
    """
    timesteps = boundaries.reverse_schedule()
    if not renoise:
        return ddim_loop(eps_reverse, noise, cond, timesteps, schedule=schedule).final
    if fresh_noise is None:
        raise ValueError("icd_decode: renoise > 0 needs fresh_noise")
    x = noise
    for t, s in zip(timesteps, timesteps[1:]):
        z = fresh_noise() if s > 0 else torch.zeros_like(x)
        x = renoised_jump(x, eps_reverse(x, t, cond), t, s, schedule=schedule, gamma=renoise, z=z)
    return x


class SeededNoise:
    """Per-sample N(0, I) draws: row i comes from its own generator seeded with seeds[i], so every draw of a row is
    independent of the batch it runs in. The first call gives `initial_noise`; later calls give fresh noise."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], device="cpu"):
        self.shape, self.device = tuple(shape), device
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device="cpu") -> torch.Tensor:
    """Independent N(0, I) noise per sample: row i comes from seed seeds[i] (batch-size independent)."""
    return SeededNoise(shape, seeds, device)()
