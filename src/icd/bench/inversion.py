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
from icd.bench.methods import Method
from icd.bench.runtime import Shards, case_records, chunked, example_indices, sync, timed_runs
from icd.editing.editor import Editor
from icd.editing.inversion import ddim_decode, ddim_invert, icd_decode, icd_invert
from icd.imageio import to_uint8
from icd.metrics import ms_ssim, psnr, ssim


@torch.no_grad()
def reconstruct(editor: Editor, method: Method, images: np.ndarray, prompts: list[str], guidance: float,
                tau: float | None) -> tuple[np.ndarray, dict]:
    """uint8 reconstructions and the timing / NFE of the two halves (uint8 in, uint8 out)."""
    if method.family == "icd":
        model = editor.icd_model
    elif method.family == "gddim":
        model = editor.icd_model  # the guidance-distilled UNet, adapters off
    else:
        model = editor.base()
    model.counter.reset()
    sync(model.device)
    t0 = time.perf_counter()
    z0 = model.encode_images(images)
    cond = model.encode_prompt(prompts)
    if method.family == "icd":
        b = model.icd.boundaries
        inv = icd_invert(model, z0, cond, prompts, b)
    else:
        inv = ddim_invert(model, z0, cond, prompts, steps=method.steps)
    sync(model.device)
    t1, nfe_invert = time.perf_counter(), model.counter.calls
    if method.family == "icd":
        z = icd_decode(model, inv.noise, cond, b, guidance=guidance, tau=model.icd.tau if tau is None else tau)
    else:
        z = ddim_decode(model, inv, cond, guidance=guidance, tau=tau)
    recon = to_uint8(model.decode_latents(z))
    sync(model.device)
    t2 = time.perf_counter()
    return recon, {"seconds": t2 - t0, "seconds_invert": t1 - t0, "seconds_decode": t2 - t1,
                   "nfe": model.counter.calls, "nfe_invert": nfe_invert, "nfe_decode": model.counter.calls - nfe_invert}


def measure_quality(editor: Editor, method: Method, cases: Sequence[BenchCase], *, guidance: float,
                    tau: float | None, batch: int, shards: Shards, examples: int = 0, metrics: dict | None = None,
                    progress: bool = True) -> list[dict]:
    indexed = list(enumerate(cases))
    chunks = shards.mine(chunked(indexed, batch))
    shown = example_indices(cases, examples)
    records = []
    for chunk in tqdm(chunks, desc=f"invert {method.name}", unit="batch", disable=not progress, leave=False):
        part = [c for _, c in chunk]
        src = np.stack([c.source for c in part])
        recon, _ = reconstruct(editor, method, src, [c.source_prompt for c in part], guidance, tau)
        values = {"psnr": psnr(src, recon), "ssim": ssim(src, recon), "ms_ssim": ms_ssim(src, recon)}
        if metrics and "lpips" in metrics:
            values["lpips"] = metrics["lpips"](src, recon)
        rows = [{name: float(v[k]) for name, v in values.items()} for k in range(len(part))]
        records += case_records(method.name, chunk, rows, recon, shown)
    return records


def measure_speed(editor: Editor, method: Method, cases: Sequence[BenchCase], *, guidance: float,
                  tau: float | None, shards: Shards) -> list[dict]:
    return timed_runs(shards, cases,
                      lambda c: reconstruct(editor, method, c.source[None], [c.source_prompt], guidance, tau)[1])
