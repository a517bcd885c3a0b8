"""`icd bench inversion`: reconstruction (invert, then decode with the source prompt) for every method on the same
images — the paper's Table-2 protocol: PSNR / SSIM / MS-SSIM of the reconstruction against the input image,
counted NFE and seconds. Unguided by default; ``guidance``/``tau`` decode with (dynamic) CFG as in Table 5.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icd.bench.cases import BenchCase
from icd.bench.methods import BenchMethod
from icd.bench.runtime import case_records, chunked, example_indices, sync, timed_runs
from icd.bench.task import BenchTask, RunContext
from icd.imageio import to_uint8
from icd.metrics import ms_ssim, psnr, ssim
from icd.pipeline import Pipeline


@torch.no_grad()
def reconstruct(pipe: Pipeline, method: BenchMethod, images: np.ndarray, prompts: list[str], *, ctx: RunContext
                ) -> tuple[np.ndarray, dict]:
    """uint8 reconstructions and the timing / NFE of the two halves (uint8 in, uint8 out)."""
    if method.method == "vae":
        return autoencode(pipe, images)
    pipe.model_for(method.method).counter.reset()
    r = pipe.reconstruct(images, prompts, method=method.method, steps=method.steps, guidance=ctx.guidance,
                         tau=ctx.tau, ddim_rule=ctx.ddim_rule)
    return r.images, {"seconds": r.seconds_invert + r.seconds_decode, "seconds_invert": r.seconds_invert,
                      "seconds_decode": r.seconds_decode, "nfe": r.nfe_invert + r.nfe_decode,
                      "nfe_invert": r.nfe_invert, "nfe_decode": r.nfe_decode}


def autoencode(pipe: Pipeline, images: np.ndarray) -> tuple[np.ndarray, dict]:
    """The `vae` method: encode to clean latents and decode, no UNet call (timed like a reconstruction)."""
    model = pipe.model
    sync(model.device)
    t0 = time.perf_counter()
    z0 = model.encode_images(images)
    sync(model.device)
    t1 = time.perf_counter()
    recon = to_uint8(model.decode_latents(z0))
    sync(model.device)
    t2 = time.perf_counter()
    return recon, {"seconds": t2 - t0, "seconds_invert": t1 - t0, "seconds_decode": t2 - t1, "nfe": 0,
                   "nfe_invert": 0, "nfe_decode": 0}


def measure_quality(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    indexed = list(enumerate(cases))
    chunks = ctx.shards.mine(chunked(indexed, ctx.batch))
    shown = example_indices(cases, ctx.examples)
    records = []
    for chunk in tqdm(chunks, desc=f"invert {method.name}", unit="batch", disable=not ctx.progress, leave=False):
        part = [c for _, c in chunk]
        src = np.stack([c.source for c in part])
        recon, _ = reconstruct(pipe, method, src, [c.source_prompt for c in part], ctx=ctx)
        values = {"psnr": psnr(src, recon), "ssim": ssim(src, recon), "ms_ssim": ms_ssim(src, recon)}
        if "lpips" in ctx.metrics:
            values["lpips"] = ctx.metrics["lpips"](src, recon)
        rows = [{name: float(v[k]) for name, v in values.items()} for k in range(len(part))]
        records += case_records(method.name, chunk, rows, images=recon, shown=shown)
    return records


def measure_speed(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    return timed_runs(ctx.shards, cases,
                      lambda c: reconstruct(pipe, method, c.source[None], [c.source_prompt], ctx=ctx)[1],
                      warm_all=ctx.warm_all)


TASK = BenchTask("inversion", method_task="reconstruct", extra_methods=("vae",), default_methods="icd,ddim50,ddim4",
                 flow_methods="flow-ode50,flow-ode4,fireflow8,rf-inversion28", default_guidance=0.0,
                 measure_quality=measure_quality, measure_speed=measure_speed, optional_metrics=("lpips",))
