"""What the harness measures on: edit cases (source, prompts, optional mask and ground truth) and their sources.

A `BenchCase` is the one type the editing benchmark consumes. World cases carry a pixel-exact rendered target and
mask (`icd.world.make_case`); PIE-Bench cases (`icd.bench.piebench`) carry a mask but no target image. Seeds of
world cases come from the held-out range (>= `icd.world.EVAL_SEED_START`) unless the caller chooses otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icd import world

# default first seed of each benchmark's world cases: held out from training, one block per task
SEED_START = {"editing": world.EVAL_SEED_START + 500_000, "inversion": world.EVAL_SEED_START + 300_000,
              "generation": world.EVAL_SEED_START + 100_000, "guidance": world.EVAL_SEED_START + 400_000}
KIND_STRIDE = 1000  # world cases of kind j use seeds seed_start + KIND_STRIDE * j + i (i < n <= KIND_STRIDE)


@dataclass(frozen=True)
class BenchCase:
    case_id: str
    kind: str  # edit kind: a world kind (color, shape, background, size) or a PIE-Bench editing type
    source: np.ndarray  # uint8 [H, W, 3]
    source_prompt: str
    target_prompt: str
    mask: np.ndarray | None = None  # bool [H, W], True where the edit may change pixels (None: unknown)
    target: np.ndarray | None = None  # uint8 [H, W, 3], the exact answer when known (world cases)
    blend_words: tuple[str, str] | None = None  # (source word, target word) for P2P local blend
    seed: int | None = None  # the world seed the case comes from (generation starts its noise from it)


def world_cases(kinds: Sequence[str], n: int, seed_start: int = SEED_START["editing"]) -> list[BenchCase]:
    """`n` world edit cases per kind, kind-major; case ids are ``<kind>-<seed>``. Kind j draws its seeds from
    ``seed_start + KIND_STRIDE * j`` on, skipping scenes that admit no edit of that kind."""
    if not 0 < n <= KIND_STRIDE:
        raise ValueError(f"--n must lie in 1..{KIND_STRIDE} cases per kind, got {n}")
    cases = []
    for j, kind in enumerate(kinds):
        seeds = iter(range(seed_start + KIND_STRIDE * j, seed_start + KIND_STRIDE * (j + 1)))
        for _ in range(n):
            while True:  # skip the few scenes that admit no edit of this kind
                seed = next(seeds)
                try:
                    c = world.make_case(kind, seed)
                    break
                except world.NoEditError:
                    continue
            cases.append(BenchCase(case_id=f"{kind}-{seed}", kind=kind, source=c.source,
                                   source_prompt=c.source_prompt, target_prompt=c.target_prompt, mask=c.mask,
                                   target=c.target, blend_words=c.blend_words, seed=seed))
    return cases


def object_kind(n_objects: int) -> str:
    return "1-object" if n_objects == 1 else f"{n_objects}-objects"


def world_scenes(n: int, seed_start: int = SEED_START["inversion"], *, max_objects: int = 2) -> list[BenchCase]:
    """`n` held-out world images with their captions (for inversion), kind = number of objects."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    cases = []
    for i in range(n):
        scene = world.sample_scene(seed_start + i, max_objects=max_objects)
        cases.append(BenchCase(case_id=f"scene-{seed_start + i}", kind=object_kind(len(scene.objects)),
                               source=world.render(scene), source_prompt=scene.caption,
                               target_prompt=scene.caption, seed=seed_start + i))
    return cases
