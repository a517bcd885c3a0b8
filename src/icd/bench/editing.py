"""`icd bench editing`: every method edits the same cases with the same controls; quality against the world's
ground truth (or a PIE-Bench mask), counted NFE and timed single-image edits, in one run.

Controls per case kind (docs/method.md §8.2, docs/baselines.md §3-4): Prompt-to-Prompt word swap with the case's
blend words for rigid edits, MasaCtrl for non-rigid ones (`NON_RIGID_KINDS`); SDEdit (``sdedit``, ``sdedit-icd``)
takes no attention control and no inversion (its noising costs 0 UNet calls); InstructPix2Pix (``ip2p``) neither: it
edits from an instruction derived from the two prompts, at its weights' validated guidance scales (the run's
--guidance does not apply to it), and its "reconstruction" is the VAE round trip of the source latent it reads.
Quality is measured on batches of `batch` cases of one kind (one UNet call per step for the batch of [sources,
targets]); speed on `n_timing` single-image edits, each timed from the uint8 image to the uint8 edit (text encoder,
VAE and UNet calls included, model loading excluded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icd import world
from icd.bench.cases import BenchCase
from icd.bench.methods import BenchMethod
from icd.bench.runtime import case_records, chunked, example_indices, sync, timed_runs
from icd.bench.task import BenchTask, RunContext
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.methods import REGISTRY
from icd.metrics import ms_ssim, psnr, ssim
from icd.models import lora
from icd.pipeline import Pipeline

NON_RIGID_KINDS = frozenset({"size", "change_pose"})


def controls_for(method: str, cases: Sequence[BenchCase], guidance: float, tau: float | None):
    """The controls of one batch of cases of one kind for the registered `method`: MasaCtrl for non-rigid kinds,
    else Prompt-to-Prompt at the method's settings (`Method.p2p_defaults`: iCD as the official iCD launch,
    docs/method.md §8.2; DDIM and NPI as NPI's paper; NTI as the NTI paper, docs/baselines.md §3-4) with each case's
    blend words (local blend only when every case of the batch has them); a method without attention control
    (SDEdit) its plain controls; one with scales of its own (IP2P: `bench_guidance` False) its defaults."""
    m = REGISTRY.get(method)
    guidance = guidance if m.bench_guidance else None
    tau = tau if m.takes_tau and m.bench_guidance else None
    if not m.attention_control:
        return m.controls(guidance=guidance, tau=tau)
    if cases[0].kind in NON_RIGID_KINDS:
        return m.controls(guidance=guidance, tau=tau, masactrl=MasaCtrlControls())
    blend = None
    if all(c.blend_words for c in cases):
        blend = [((c.blend_words[0],), (c.blend_words[1],)) for c in cases]
    return m.controls(guidance=guidance, tau=tau, p2p=P2PControls(**m.p2p_defaults, blend_words=blend))


def case_metrics(cases: Sequence[BenchCase], edited: np.ndarray, recon: np.ndarray) -> list[dict]:
    """Per-case PSNR / SSIM / MS-SSIM of the reconstruction, against the rendered target and outside the mask."""
    src = np.stack([c.source for c in cases])
    rows = [{} for _ in cases]

    def put(name: str, values: np.ndarray, which: list[int]) -> None:
        for i, v in zip(which, values):
            rows[i][name] = float(v)

    every = list(range(len(cases)))
    put("psnr", psnr(src, recon), every)
    put("ssim", ssim(src, recon), every)
    put("ms_ssim", ms_ssim(src, recon), every)
    with_gt = [i for i, c in enumerate(cases) if c.target is not None]
    if with_gt:
        tgt = np.stack([cases[i].target for i in with_gt])
        put("gt_psnr", psnr(tgt, edited[with_gt]), with_gt)
        put("gt_ssim", ssim(tgt, edited[with_gt]), with_gt)
    with_mask = [i for i, c in enumerate(cases) if c.mask is not None]
    if with_mask:
        outside = ~np.stack([cases[i].mask for i in with_mask])
        put("bg_psnr", psnr(src[with_mask], edited[with_mask], outside), with_mask)
        put("bg_ssim", ssim(src[with_mask], edited[with_mask], outside), with_mask)
    return rows


def judge_correct(judge, cases: Sequence[BenchCase], edited: np.ndarray) -> list[float | None]:
    """1.0 when the world judge reads exactly the target caption, None for prompts outside the world."""
    readable = [i for i, c in enumerate(cases) if not world.unknown_words(c.target_prompt)]
    out: list[float | None] = [None] * len(cases)
    if readable:
        readings = judge.read(edited[readable])
        for i, r in zip(readable, readings):
            out[i] = float(r == world.parse_caption(cases[i].target_prompt))
    return out


def optional_metrics(metrics: dict[str, Callable], cases: Sequence[BenchCase], edited: np.ndarray,
                     recon: np.ndarray) -> list[dict]:
    """Weight-based metrics the user has weights for (icd.bench.optional_metrics)."""
    src = np.stack([c.source for c in cases])
    rows = [{} for _ in cases]
    values: dict[str, np.ndarray] = {}
    if "lpips" in metrics:
        values["lpips"] = metrics["lpips"](src, recon)
        if all(c.mask is not None for c in cases):
            keep = (~np.stack([c.mask for c in cases]))[..., None]
            values["bg_lpips"] = metrics["lpips"](src * keep, edited * keep)
    if "clip_t" in metrics:
        values["clip_t"] = metrics["clip_t"](edited, [c.target_prompt for c in cases])
    if "clip_i" in metrics:
        values["clip_i"] = metrics["clip_i"](src, edited)
    if "dino" in metrics:
        values["dino"] = metrics["dino"](src, edited)
    for name, v in values.items():
        for row, x in zip(rows, np.asarray(v, dtype=np.float64)):
            row[name] = float(x)
    return rows


def edit_batch(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext):
    sources = np.stack([c.source for c in cases])
    inv = pipe.invert(sources, [c.source_prompt for c in cases], method=method.method, steps=method.steps,
                      guidance=ctx.guidance, strength=method.strength, ddim_rule=ctx.ddim_rule)
    return pipe.edit(inv, [c.target_prompt for c in cases], controls_for(method.method, cases, ctx.guidance, ctx.tau))


def measure_quality(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    """Per-case records of this process's chunks (case["index"] orders them globally)."""
    indexed = list(enumerate(cases))
    chunks = ctx.shards.mine(chunked(indexed, ctx.batch, key=lambda ic: ic[1].kind))
    shown = example_indices(cases, ctx.examples)
    records = []
    for chunk in tqdm(chunks, desc=f"edit {method.name}", unit="batch", disable=not ctx.progress, leave=False):
        part = [c for _, c in chunk]
        out = edit_batch(pipe, method, part, ctx)
        rows = case_metrics(part, out.images, out.reconstructions)
        if ctx.judge is not None:
            for row, ok in zip(rows, judge_correct(ctx.judge, part, out.images)):
                if ok is not None:
                    row["judge_accuracy"] = ok
        if ctx.metrics:
            for row, extra in zip(rows, optional_metrics(ctx.metrics, part, out.images, out.reconstructions)):
                row.update(extra)
        records += case_records(method.name, chunk, rows, images=out.images, shown=shown)
    return records


def time_edit(pipe: Pipeline, method: BenchMethod, case: BenchCase, ctx: RunContext) -> dict:
    """One single-image edit, timed from uint8 input to uint8 output; NFE counted by the model's counter."""
    model = pipe.model_for(method.method)
    model.counter.reset()
    sync(model.device)
    t0 = time.perf_counter()
    inv = pipe.invert(case.source[None], [case.source_prompt], method=method.method, steps=method.steps,
                      guidance=ctx.guidance, strength=method.strength, ddim_rule=ctx.ddim_rule)
    sync(model.device)
    t1, nfe_invert = time.perf_counter(), model.counter.calls
    pipe.edit(inv, [case.target_prompt], controls_for(method.method, [case], ctx.guidance, ctx.tau))
    sync(model.device)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "seconds_invert": t1 - t0, "seconds_edit": t2 - t1, "nfe": model.counter.calls,
            "nfe_invert": nfe_invert, "nfe_edit": model.counter.calls - nfe_invert}


@torch.no_grad()
def bare_network_seconds(pipe: Pipeline, case: BenchCase) -> float:
    """The network evaluations an iCD edit of one image cannot avoid, timed alone: text encoder (source and
    target), VAE encode, the forward UNet calls at batch 1, the reverse calls at batch 2, VAE decode at batch 2."""
    model = pipe.model_for("icd")
    forward, reverse = model.eps_fn(adapter=lora.FORWARD), model.eps_fn(adapter=lora.REVERSE)
    sync(model.device)
    t0 = time.perf_counter()
    cond = model.encode_prompt([case.source_prompt, case.target_prompt])
    z = model.encode_images(case.source[None])
    for t in model.icd.boundaries.forward_schedule()[:-1]:
        z = forward(z, t, cond.index([0]))
    x = torch.cat([z, z])
    for t in model.icd.boundaries.reverse_schedule()[:-1]:
        x = reverse(x, t, cond)
    model.decode_latents(x)
    sync(model.device)
    return time.perf_counter() - t0


def measure_speed(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext) -> list[dict]:
    """Timed single-image edits of this process's share of `cases` (iCD also times its bare network calls)."""

    def run(case: BenchCase) -> dict:
        t = time_edit(pipe, method, case, ctx)
        if method.method == "icd":  # iCD's floor: its network calls alone
            t["seconds_bare"] = bare_network_seconds(pipe, case)
        return t

    return timed_runs(ctx.shards, cases, run, warm_all=ctx.warm_all)


TASK = BenchTask("editing", method_task="edit", flow_methods="flow-ode50,flow-ode4,fireflow8,rf-inversion28,flowedit28",
                 default_methods="icd,ddim50,ddim4,npi50,nti50", default_guidance=1.0, measure_quality=measure_quality,
                 measure_speed=measure_speed, optional_metrics=("lpips", "clip_t", "clip_i", "dino"), uses_judge=True)
