"""What every benchmark task shares: the run's context and the task record the harness dispatches on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from icd.bench.runtime import Shards
from icd.methods import REGISTRY


@dataclass(frozen=True)
class RunContext:
    """One run's settings, as every task's `measure_quality` / `measure_speed` receives them."""

    guidance: float
    tau: float | None
    shards: Shards
    renoise: float | None = None  # generation: the icd methods' re-noising strength
    ddim_rule: str = "reference"  # DDIM inversion's noise label (icd.samplers.DDIM_RULES)
    batch: int = 50
    examples: int = 0
    progress: bool = True
    judge: object | None = None  # the world judge (editing, generation) where it can read the prompts
    metrics: dict = field(default_factory=dict)  # optional weight-based metrics (icd.bench.optional_metrics)
    warm_all: bool = False  # time only after an untimed run of every timed case (compiled UNets: every graph built)


@dataclass(frozen=True)
class BenchTask:
    """A benchmark: the methods it measures (the registry's methods of `method_task`, then `extra_methods`), its
    defaults, and its two measurements, each ``(pipeline, method, cases, ctx) -> records``."""

    name: str
    method_task: str | None  # the registry task its methods serve (`icd.methods.REGISTRY`); None: extra_methods only
    default_methods: str
    default_guidance: float
    measure_quality: Callable[..., list[dict]]
    measure_speed: Callable[..., list[dict]]
    optional_metrics: tuple[str, ...] = ()  # weight-based metrics that apply (lpips, clip_t, ...)
    uses_judge: bool = False
    stepped: bool = True  # method names carry a step count (False: no sampler runs)
    extra_methods: tuple[str, ...] = ()  # rows beyond the registry's task (the bench's own ``vae``)
    flow_methods: str = ""  # the default methods on a rectified-flow model ("": default_methods)

    @property
    def methods(self) -> tuple[str, ...]:
        """The method names it measures, read from the registry when asked (a method registered later counts)."""
        return (*(REGISTRY.names(self.method_task) if self.method_task else ()), *self.extra_methods)

    def measure(self, pipe, method, cases: Sequence, *, timed: Sequence, ctx: RunContext) -> tuple[list, list]:
        """(quality records, timing records) of one method, gathered across processes."""
        quality = ctx.shards.gather(self.measure_quality(pipe, method, cases, ctx))
        return quality, ctx.shards.gather(self.measure_speed(pipe, method, timed, ctx))
