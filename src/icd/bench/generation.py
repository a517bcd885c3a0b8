"""`icd bench generation`: text-to-image from held-out world captions; the world judge reads every image and
scores it against its caption (exact caption, per attribute), with counted NFE and seconds per image."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icd import world
from icd.bench.cases import BenchCase
from icd.bench.methods import Method
from icd.bench.runtime import Shards, case_records, chunked, example_indices, sync, timed_runs
from icd.editing.editor import Editor
from icd.imageio import to_uint8
from icd.sampling import generate


def prompt_cases(n: int, seed_start: int, objects: Sequence[int] = (1, 2)) -> list[BenchCase]:
    """`n` held-out captions per object count (kind ``1-object`` / ``2-objects``); case.source is the rendered
    scene of the caption (a reference, not a target: the layout is free)."""
    from icd.bench.cases import KIND_STRIDE, object_kind

    cases = []
    for j, k in enumerate(objects):
        for i in range(n):
            seed = seed_start + KIND_STRIDE * 100 * j + i
            scene = world.sample_scene(seed, n_objects=k)
            cases.append(BenchCase(case_id=f"prompt-{seed}", kind=object_kind(k), source=world.render(scene),
                                   source_prompt=scene.caption, target_prompt=scene.caption, seed=seed))
    return cases


def _model(editor: Editor, method: Method):
    return editor.base() if method.family == "ddim" else editor.icd_model


@torch.no_grad()
def sample(editor: Editor, method: Method, prompts: list[str], seeds: list[int], guidance: float,
           tau: float | None, renoise: float | None = None) -> np.ndarray:
    """uint8 images; sample i starts from noise seeded with seeds[i] (batch-size independent). tau None is constant
    guidance for every method, as in `icd generate` (method.md §8.4: generation runs without dynamic CFG); renoise
    applies to icd methods only."""
    model = _model(editor, method)
    kw = {"method": "icd", "renoise": renoise} if method.family == "icd" else {"method": "ddim", "steps": method.steps}
    if any(b - a != 1 for a, b in zip(seeds, seeds[1:])):
        raise ValueError("a generation batch needs consecutive seeds")
    return to_uint8(generate(model, prompts, seed=seeds[0], guidance=guidance, tau=tau, batch_size=len(prompts), **kw))


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


def measure_quality(editor: Editor, method: Method, cases: Sequence[BenchCase], *, guidance: float,
                    tau: float | None, batch: int, shards: Shards, judge, examples: int = 0,
                    progress: bool = True, renoise: float | None = None) -> list[dict]:
    indexed = list(enumerate(cases))
    chunks = shards.mine(chunked(indexed, batch, key=lambda ic: ic[1].kind))
    shown = example_indices(cases, examples)
    records = []
    for chunk in tqdm(chunks, desc=f"generate {method.name}", unit="batch", disable=not progress, leave=False):
        part = [c for _, c in chunk]
        images = sample(editor, method, [c.source_prompt for c in part], [c.seed for c in part], guidance, tau,
                        renoise)
        rows = caption_scores(judge, images, [c.source_prompt for c in part])
        records += case_records(method.name, chunk, rows, images, shown)
    return records


def measure_speed(editor: Editor, method: Method, cases: Sequence[BenchCase], *, guidance: float,
                  tau: float | None, shards: Shards, renoise: float | None = None) -> list[dict]:
    model = _model(editor, method)

    def run(c: BenchCase) -> dict:
        model.counter.reset()
        sync(model.device)
        t0 = time.perf_counter()
        sample(editor, method, [c.source_prompt], [c.seed], guidance, tau, renoise)
        sync(model.device)
        return {"seconds": time.perf_counter() - t0, "nfe": model.counter.calls,
                "unet_rows": sum(model.counter.batch_sizes)}

    return timed_runs(shards, cases, run)
