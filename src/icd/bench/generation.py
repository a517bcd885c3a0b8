"""`icd bench generation`: text-to-image from held-out world captions; the world judge reads every image and
scores it against its caption (exact caption, per attribute), with counted NFE and seconds per image."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icd import world
from icd.bench.cases import KIND_STRIDE, BenchCase, object_kind
from icd.bench.methods import BenchMethod
from icd.bench.runtime import case_records, chunked, example_indices, sync, timed_runs
from icd.bench.task import BenchTask, RunContext
from icd.methods import REGISTRY
from icd.pipeline import Pipeline


def prompt_cases(n: int, seed_start: int, objects: Sequence[int] = (1, 2)) -> list[BenchCase]:
    """`n` held-out captions per object count (kind ``1-object`` / ``2-objects``); case.source is the rendered
    scene of the caption (a reference, not a target: the layout is free)."""
    cases = []
    for j, k in enumerate(objects):
        for i in range(n):
            seed = seed_start + KIND_STRIDE * 100 * j + i
            scene = world.sample_scene(seed, n_objects=k)
            cases.append(BenchCase(case_id=f"prompt-{seed}", kind=object_kind(k), source=world.render(scene),
                                   source_prompt=scene.caption, target_prompt=scene.caption, seed=seed))
    return cases


@torch.no_grad()
def sample(pipe: Pipeline, method: BenchMethod, prompts: list[str], seeds: list[int], *, ctx: RunContext) -> np.ndarray:
    """uint8 images; sample i starts from noise seeded with seeds[i] (batch-size independent). tau None is constant
    guidance for every method, as in `icd generate` (docs/method.md §8.4: generation runs without dynamic CFG);
    renoise applies to icd methods only."""
    if any(b - a != 1 for a, b in zip(seeds, seeds[1:])):
        raise ValueError("a generation batch needs consecutive seeds")
    renoise = ctx.renoise if REGISTRY.get(method.method).renoises else None
    return pipe.generate(prompts, method=method.method, steps=method.steps, guidance=ctx.guidance, tau=ctx.tau,
                         renoise=renoise, seed=seeds[0], batch_size=len(prompts)).uint8()


def caption_scores(judge, images: np.ndarray, captions: Sequence[str]) -> list[dict]:
    """Per image, as the world judge reads it against its caption: exact caption, background and object count
    right (1.0 or 0.0)."""
    rows = []
    for caption, r in zip(captions, judge.read(images)):
        truth = world.parse_caption(caption)
        rows.append({"judge_accuracy": float(r == truth),
                     "background_accuracy": float(r.background == truth.background),
                     "count_accuracy": float(len(r.objects) == len(truth.objects))})
    return rows


def measure_quality(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    indexed = list(enumerate(cases))
    chunks = ctx.shards.mine(chunked(indexed, ctx.batch, key=lambda ic: ic[1].kind))
    shown = example_indices(cases, ctx.examples)
    records = []
    for chunk in tqdm(chunks, desc=f"generate {method.name}", unit="batch", disable=not ctx.progress, leave=False):
        part = [c for _, c in chunk]
        images = sample(pipe, method, [c.source_prompt for c in part], [c.seed for c in part], ctx=ctx)
        rows = caption_scores(ctx.judge, images, [c.source_prompt for c in part])
        records += case_records(method.name, chunk, rows, images=images, shown=shown)
    return records


def measure_speed(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    model = pipe.model_for(method.method)

    def run(c: BenchCase) -> dict:
        model.counter.reset()
        sync(model.device)
        t0 = time.perf_counter()
        sample(pipe, method, [c.source_prompt], [c.seed], ctx=ctx)
        sync(model.device)
        return {"seconds": time.perf_counter() - t0, "nfe": model.counter.calls,
                "unet_rows": sum(model.counter.batch_sizes)}

    return timed_runs(ctx.shards, cases, run, warm_all=ctx.warm_all)


TASK = BenchTask("generation", method_task="generate", default_methods="icd,gddim50,ddim50",
                 default_guidance=1.0, measure_quality=measure_quality, measure_speed=measure_speed,
                 uses_judge=True)
