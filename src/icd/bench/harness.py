"""One benchmark run: cases, methods, this process's share, gather, aggregate, write (``icd bench …``).

    from icd.bench import BenchOptions, run_bench
    results = run_bench(BenchOptions(task="editing", n=20, methods="icd,ddim50", out="out/bench/edit"))

Writes ``results.json`` (schema: `icd.bench.results`), ``results.md``, ``quality-vs-nfe.png``, ``seconds.png``,
``per-kind.png`` and ``examples.png`` into ``out`` (the main process only).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from icd import world
from icd.bench import editing, generation, guidance, inversion
from icd.bench.cases import KIND_STRIDE, SEED_START, world_cases, world_scenes
from icd.bench.methods import parse_methods, parse_steps_list
from icd.bench.optional_metrics import load_optional_metrics
from icd.bench.piebench import load_pie_bench
from icd.bench.report import example_grid, markdown, plots
from icd.bench.results import SCHEMA_VERSION, method_entry, validate, write_json
from icd.bench.runtime import Shards, describe_device, strip_images, timing_cases
from icd.bench.task import BenchTask, RunContext
from icd.guidance import MAX_GUIDANCE
from icd.io import folder_problem, write_text_atomic
from icd.judge import JudgeScorer
from icd.methods import DEFAULT_DDIM_RULE, DEFAULT_RENOISE
from icd.methods import REGISTRY as METHODS
from icd.models.loading import model_kind
from icd.pipeline import Pipeline
from icd.samplers import DDIM_RULES

REGISTRY: dict[str, BenchTask] = {t.name: t for t in (inversion.TASK, editing.TASK, generation.TASK, guidance.TASK)}
TASKS = tuple(REGISTRY)
RESULT_FILES = ("results.json", "results.md")
MAX_CASES = 10_000  # images (inversion, guidance) or prompts per object count (generation) of one run


@dataclass
class BenchOptions:
    task: str
    out: str
    n: int = 20  # cases per kind (editing, generation) or images (inversion)
    methods: str | None = None  # default: the task's default_methods
    seed_start: int | None = None  # default: SEED_START[task] (held out from training)
    kinds: str | None = None  # editing: world edit kinds (default all); PIE-Bench: editing types
    steps_list: str | None = None  # expands ddim / gddim / npi / nti without a step count
    adapters: dict[str, str] = field(default_factory=dict)  # icd:NAME -> adapters folder (or training checkpoint)
    export_checkpoint: Callable[[Path, Path], object] | None = None  # exports a training checkpoint's adapters
    # (`icd.train.icd.export_checkpoint`; the CLI passes it: the bench itself does not depend on training)
    model: str = "embedded"
    ip2p: str | None = None  # InstructPix2Pix weights of the ip2pK methods (default: <model>/ip2p)
    guidance: float | None = None  # code w = CFG - 1; default 1 (editing, generation), 0 (inversion)
    tau: float | None = None  # dynamic-CFG threshold (None: the adapters' tau for icd, constant otherwise)
    renoise: float | None = None  # generation: icd methods' re-noising strength (None: icd.pipeline.DEFAULT_RENOISE)
    ddim_rule: str = DEFAULT_DDIM_RULE  # DDIM inversion's noise label (ddim / gddim / npi / nti; icd.samplers)
    batch: int = 50
    n_timing: int = 5
    examples: int = 2  # example cases per kind in examples.png
    pie_bench: str | None = None
    lpips: str | None = None
    clip: str | None = None
    dino: str | None = None
    device: str = "auto"
    compile: str | None = None  # torch.compile mode of the UNets (icd.models.compiled; None: eager)
    force: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown benchmark {self.task!r}; choose from {', '.join(TASKS)}")
        if self.renoise is not None and self.task != "generation":
            raise ValueError("--renoise applies to the generation benchmark only (inversion needs the deterministic "
                             "jumps)")
        if self.renoise is not None and not 0.0 <= self.renoise <= 1.0:
            raise ValueError(f"--renoise must lie in [0, 1], got {self.renoise}")
        for name in ("n", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        most = KIND_STRIDE if self.task == "editing" and not self.pie_bench else MAX_CASES
        if self.n > most:
            raise ValueError(f"--n must lie in 1..{most}, got {self.n}")
        if self.seed_start is not None and self.seed_start < 0:
            raise ValueError(f"--seed-start must be >= 0 (world seeds), got {self.seed_start}")
        if self.methods is not None and not self.methods.strip(" ,"):
            raise ValueError("--methods names no method (leave it out for the task's default methods)")
        if self.guidance is not None and not (math.isfinite(self.guidance) and 0 <= self.guidance <= MAX_GUIDANCE):
            raise ValueError(f"--guidance must be a code w = CFG - 1 in [0, {MAX_GUIDANCE:g}], got {self.guidance}")
        if self.tau is not None and not (math.isfinite(self.tau) and 0 <= self.tau <= 1):
            raise ValueError(f"--tau must lie in [0, 1], got {self.tau}")
        if not str(self.out).strip():
            raise ValueError("--out must name a folder")
        if self.ddim_rule not in DDIM_RULES:
            raise ValueError(f"--ddim-rule must be one of {', '.join(DDIM_RULES)}, got {self.ddim_rule!r}")
        if self.n_timing < 1 or self.examples < 0:
            raise ValueError("--n-timing must be >= 1 and --examples >= 0")
        if self.pie_bench and self.task not in ("inversion", "editing"):
            raise ValueError("--pie-bench applies to the inversion and editing benchmarks")


def _cases(opts: BenchOptions, model) -> tuple[list, str, list[str], int | None]:
    if opts.pie_bench:
        kinds = opts.kinds.split(",") if opts.kinds else None
        cases = load_pie_bench(opts.pie_bench, limit=None, kinds=kinds, image_size=model.image_size)
        if opts.n:
            per: dict[str, int] = {}
            kept = []
            for c in cases:
                if per.get(c.kind, 0) < opts.n:
                    kept.append(c)
                    per[c.kind] = per.get(c.kind, 0) + 1
            cases = kept
        return cases, f"pie-bench:{opts.pie_bench}", list(dict.fromkeys(c.kind for c in cases)), None
    seed = SEED_START[opts.task] if opts.seed_start is None else opts.seed_start
    if opts.task == "editing":
        kinds = opts.kinds.split(",") if opts.kinds else list(world.EDIT_KINDS)
        bad = [k for k in kinds if k not in world.EDIT_KINDS]
        if bad:
            raise ValueError(f"unknown edit kind {bad[0]!r}; choose from {', '.join(world.EDIT_KINDS)}")
        return world_cases(kinds, opts.n, seed), "world", kinds, seed
    if opts.kinds:
        raise ValueError(f"--kinds applies to editing; the {opts.task} benchmark groups cases by object count")
    if opts.task in ("inversion", "guidance"):
        cases = world_scenes(opts.n, seed)
    else:
        cases = generation.prompt_cases(opts.n, seed)
    return cases, "world", list(dict.fromkeys(c.kind for c in cases)), seed


def run_bench(opts: BenchOptions) -> dict:
    """Run one benchmark; every process returns the same results dict, the main process writes the files."""
    task = REGISTRY[opts.task]
    out = Path(opts.out)
    problem = folder_problem(out)  # before any compute: a run must not end in "cannot write"
    if problem:
        raise ValueError(f"--out {out}: {problem}")
    if not opts.force and any((out / f).exists() for f in RESULT_FILES):
        raise FileExistsError(f"{out} already holds results; pass --force to replace them")
    default = task.flow_methods if task.flow_methods and model_kind(opts.model) == "flow" else task.default_methods
    names = default if opts.methods is None else opts.methods  # "" is an error, not the default
    methods = parse_methods(names, steps_list=parse_steps_list(opts.steps_list),
                            allowed=task.methods, adapters=opts.adapters, stepped=task.stepped)
    shards = Shards(opts.device)
    adapters = {name: _adapters_folder(opts, path, name, shards) for name, path in opts.adapters.items()}
    guidance = opts.guidance if opts.guidance is not None else task.default_guidance
    pipe = Pipeline.from_pretrained(opts.model, device=shards.device, ip2p=opts.ip2p, compile=opts.compile)
    for name in dict.fromkeys(m.method for m in methods if m.method in METHODS):
        METHODS.get(name).prepare(pipe)  # e.g. IP2P's weights: a missing folder fails before any method runs
    pipes = {m.name: pipe if m.adapters is None else pipe.with_adapters(adapters[m.adapters]) for m in methods}
    cases, source, kinds, seed = _cases(opts, pipe.model)
    if not cases:
        raise ValueError("no cases to measure (check --kinds / the PIE-Bench folder)")

    skipped: list[dict] = []
    metrics: dict = {}
    if task.optional_metrics:
        metrics, skips = load_optional_metrics(lpips=opts.lpips, clip=opts.clip, dino=opts.dino,
                                               device=shards.device)
        skipped += [{"metric": s.metric, "reason": s.reason} for s in skips if s.metric in task.optional_metrics]
    judge = None
    if task.uses_judge:
        if all(world.unknown_words(c.target_prompt) for c in cases):
            skipped.append({"metric": "judge_accuracy", "reason": "the world judge reads world captions only"})
        else:
            judge = JudgeScorer.load(None)
    renoise = _renoise(opts)
    ctx = RunContext(guidance=guidance, tau=opts.tau, shards=shards, renoise=renoise, batch=opts.batch,
                     examples=opts.examples, progress=opts.progress and shards.is_main, judge=judge, metrics=metrics,
                     ddim_rule=opts.ddim_rule, warm_all=bool(opts.compile))
    timed = timing_cases(cases, opts.n_timing)
    results = {"schema_version": SCHEMA_VERSION, "task": opts.task, "device": describe_device(shards.device),
               "torch": torch.__version__, "icd": _version(), "model": opts.model, "n": opts.n, "seed_start": seed,
               "cases": source, "kinds": kinds, "guidance": guidance, "tau": opts.tau, "renoise": renoise,
               "ddim_rule": opts.ddim_rule, "compile": opts.compile, "processes": shards.group.world,
               "skipped_metrics": skipped, "methods": {}}
    shown: dict[str, list] = {}
    for m in methods:
        records, timings = task.measure(pipes[m.name], m, cases, timed=timed, ctx=ctx)
        records, shown[m.name] = strip_images(records)
        results["methods"][m.name] = method_entry(records, timings, kinds)
        if shards.is_main and opts.progress:
            e = results["methods"][m.name]
            print(f"{m.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in e.items() if isinstance(v, float)),
                  file=sys.stderr, flush=True)
    validate(results)
    if shards.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "results.json", results)
        write_text_atomic(out / "results.md", markdown(results))
        plots(results, out)
        sources = {c.case_id: (c.source, c.target_prompt if opts.task == "editing" else c.source_prompt,
                               c.target) for c in cases}
        if any(shown.values()):
            example_grid(shown, sources, out)
    shards.barrier()
    return results


def _renoise(opts: BenchOptions) -> float | None:
    """The icd methods' re-noising strength of a generation run (None for the other tasks)."""
    if opts.task != "generation":
        return None
    return DEFAULT_RENOISE if opts.renoise is None else opts.renoise


def _adapters_folder(opts: BenchOptions, path: str, name: str, shards: Shards) -> str:
    """An adapters folder as is; a training checkpoint (``step-NNNNNN`` with state.json) is exported first."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--adapters {name}: {p} does not exist")
    if not (p / "state.json").is_file():
        return path
    if opts.export_checkpoint is None:
        raise ValueError(f"--adapters {name}: {p} is a training checkpoint; pass BenchOptions(export_checkpoint="
                         "icd.train.icd.export_checkpoint) or an adapters folder")
    target = Path(opts.out) / f"adapters-{name}"
    if shards.is_main:
        opts.export_checkpoint(p, target)
    shards.barrier()
    return str(target)


def _version() -> str:
    try:
        return version("icd")
    except PackageNotFoundError:
        return "unknown"
