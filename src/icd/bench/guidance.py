"""`icd bench guidance`: how well the guidance-distilled UNet matches two-pass classifier-free guidance in one call
(docs/method.md §6). On held-out world images noised at t uniform on 0..999, per case: the MSE between the
student's eps(x_t, t, c, e(w)) and the original UNet's CFG output (1 + w) eps(c) - w eps(empty), and as scales the
CFG output's MSE to the true noise and the unguided prediction's MSE to the CFG output. Method: ``gddim`` (the
distilled UNet); speed: one student call per image.

The noise levels and noise of the whole run come from one seeded draw (`DRAW_SEED`), so a case's inputs depend on
`--n` but never on the batch or the process it runs in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icd.bench.cases import BenchCase
from icd.bench.methods import BenchMethod
from icd.bench.runtime import case_records, chunked, sync, timed_runs
from icd.bench.task import BenchTask, RunContext
from icd.pipeline import Pipeline
from icd.runtime import step_generator
from icd.solver import cfg_combine

DRAW_SEED = 7


def _draws(model, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [n], noise [n, C, H, W]) for the n cases of a run, from one generator."""
    gen = step_generator(DRAW_SEED, 0)
    t = torch.randint(0, model.schedule.num_timesteps, (n,), generator=gen)
    return t, torch.randn((n, *model.latent_shape()), generator=gen)


def _per_case_mse(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return ((a.float() - b.float()) ** 2).flatten(1).mean(dim=1).cpu().numpy()


@torch.no_grad()
def measure_quality(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    student, teacher = pipe.model_for("gddim"), pipe.base()
    t_all, noise_all = _draws(student, len(cases))
    indexed = list(enumerate(cases))
    records = []
    for chunk in tqdm(ctx.shards.mine(chunked(indexed, ctx.batch)), desc=f"guidance {method.name}", unit="batch",
                      disable=not ctx.progress, leave=False):
        idx = torch.tensor([i for i, _ in chunk])
        part = [c for _, c in chunk]
        z0 = student.encode_images(np.stack([c.source for c in part]))
        cond = student.encode_prompt([c.source_prompt for c in part])
        t, noise = t_all[idx].to(z0.device), noise_all[idx].to(z0.device)
        x = student.schedule.add_noise(z0, noise, t)
        eps_c = teacher.eps_fn()(x, t, cond)
        eps_u = teacher.eps_fn()(x, t, teacher.empty_cond(len(part)))
        w = torch.full((len(part),), float(ctx.guidance))
        target = cfg_combine(eps_c, eps_u, w.to(x.device))
        pred = student.eps_fn(guidance=w)(x, t, cond)
        values = {"mse_student_vs_cfg": _per_case_mse(pred, target),
                  "mse_cfg_vs_true_noise": _per_case_mse(target, noise),
                  "mse_unguided_vs_cfg": _per_case_mse(eps_c, target)}
        rows = [{k: float(v[j]) for k, v in values.items()} for j in range(len(part))]
        records += case_records(method.name, chunk, rows, images=[None] * len(part), shown=set())
    return records


@torch.no_grad()
def measure_speed(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    student = pipe.model_for("gddim")
    eps = student.eps_fn(guidance=float(ctx.guidance))

    def run(c: BenchCase) -> dict:
        z0 = student.encode_images(c.source[None])
        cond = student.encode_prompt([c.source_prompt])
        student.counter.reset()
        sync(student.device)
        t0 = time.perf_counter()
        eps(z0, 500, cond)
        sync(student.device)
        return {"seconds": time.perf_counter() - t0, "nfe": student.counter.calls}

    return timed_runs(ctx.shards, cases, run, warm_all=ctx.warm_all)


TASK = BenchTask("guidance", method_task=None, extra_methods=("gddim",), default_methods="gddim", default_guidance=1.0,
                 measure_quality=measure_quality, measure_speed=measure_speed, stepped=False)
