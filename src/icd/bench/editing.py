"""`icd bench editing`: every method edits the same cases with the same controls; quality against the world's
ground truth (or a PIE-Bench mask), counted NFE and timed single-image edits, in one run.

Controls per case kind (method.md §8.2, baselines.md §3-4): Prompt-to-Prompt word swap with the case's blend words
for rigid edits, MasaCtrl for non-rigid ones (`NON_RIGID_KINDS`). Quality is measured on batches of `batch` cases of
one kind (one UNet call per step for the batch of [sources, targets]); speed on `n_timing` single-image edits, each
timed from the uint8 image to the uint8 edit (text encoder, VAE and UNet calls included, model loading excluded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from icd import world
from icd.bench.cases import BenchCase
from icd.bench.methods import Method
from icd.bench.runtime import Shards, case_records, chunked, example_indices, sync, timed_runs
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.editor import EditControls, Editor
from icd.metrics import ms_ssim, psnr, ssim
from icd.models import lora

NON_RIGID_KINDS = frozenset({"size", "change_pose"})
# Prompt-to-Prompt settings per family: iCD as the official iCD launch (method.md §8.2); DDIM and NPI as NPI's
# paper; NTI as the NTI paper (baselines.md §3-4)
P2P_SETTINGS = {"icd": dict(cross_replace=0.3, self_replace=0.6, reweight_new_words=4.0),
                "ddim": dict(cross_replace=0.2, self_replace=0.5, reweight_new_words=3.0),
                "npi": dict(cross_replace=0.2, self_replace=0.5, reweight_new_words=3.0),
                "nti": dict(cross_replace=0.4, self_replace=0.8, reweight_new_words=3.0)}


def controls_for(family: str, cases: Sequence[BenchCase], guidance: float, tau: float | None) -> EditControls:
    """One batch of cases of one kind: MasaCtrl for non-rigid kinds, else P2P with each case's blend words (local
    blend only when every case of the batch has them)."""
    if cases[0].kind in NON_RIGID_KINDS:
        return EditControls(guidance=guidance, tau=tau, p2p=None, masactrl=MasaCtrlControls())
    blend = None
    if all(c.blend_words for c in cases):
        blend = [((c.blend_words[0],), (c.blend_words[1],)) for c in cases]
    settings = P2P_SETTINGS["ddim" if family == "gddim" else family]
    return EditControls(guidance=guidance, tau=tau, p2p=P2PControls(**settings, blend_words=blend))


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


def edit_batch(editor: Editor, method: Method, cases: Sequence[BenchCase], guidance: float, tau: float | None):
    sources = np.stack([c.source for c in cases])
    inv = editor.invert(sources, [c.source_prompt for c in cases], method=method.editor_method, steps=method.steps,
                        guidance=guidance)
    out = editor.edit(inv, [c.target_prompt for c in cases],
                      controls_for(method.family, cases, guidance, tau))
    return out


def measure_quality(editor: Editor, method: Method, cases: Sequence[BenchCase], *, guidance: float,
                    tau: float | None, batch: int, shards: Shards, judge=None, metrics: dict | None = None,
                    examples: int = 0, progress: bool = True) -> list[dict]:
    """Per-case records of this process's chunks (case["index"] orders them globally)."""
    indexed = list(enumerate(cases))
    chunks = shards.mine(chunked(indexed, batch, key=lambda ic: ic[1].kind))
    shown = example_indices(cases, examples)
    records = []
    for chunk in tqdm(chunks, desc=f"edit {method.name}", unit="batch", disable=not progress, leave=False):
        part = [c for _, c in chunk]
        out = edit_batch(editor, method, part, guidance, tau)
        rows = case_metrics(part, out.images, out.reconstructions)
        if judge is not None:
            for row, ok in zip(rows, judge_correct(judge, part, out.images)):
                if ok is not None:
                    row["judge_accuracy"] = ok
        if metrics:
            for row, extra in zip(rows, optional_metrics(metrics, part, out.images, out.reconstructions)):
                row.update(extra)
        records += case_records(method.name, chunk, rows, out.images, shown)
    return records


def time_edit(editor: Editor, method: Method, case: BenchCase, guidance: float, tau: float | None) -> dict:
    """One single-image edit, timed from uint8 input to uint8 output; NFE counted by the model's counter."""
    model = editor._for(method.editor_method)
    model.counter.reset()
    sync(model.device)
    t0 = time.perf_counter()
    inv = editor.invert(case.source[None], [case.source_prompt], method=method.editor_method, steps=method.steps,
                        guidance=guidance)
    sync(model.device)
    t1, nfe_invert = time.perf_counter(), model.counter.calls
    editor.edit(inv, [case.target_prompt], controls_for(method.family, [case], guidance, tau))
    sync(model.device)
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "seconds_invert": t1 - t0, "seconds_edit": t2 - t1, "nfe": model.counter.calls,
            "nfe_invert": nfe_invert, "nfe_edit": model.counter.calls - nfe_invert}


@torch.no_grad()
def bare_network_seconds(editor: Editor, case: BenchCase) -> float:
    """The network evaluations an iCD edit of one image cannot avoid, timed alone: text encoder (source and
    target), VAE encode, the forward UNet calls at batch 1, the reverse calls at batch 2, VAE decode at batch 2."""
    model = editor.icd_model
    sync(model.device)
    t0 = time.perf_counter()
    cond = model.encode_prompt([case.source_prompt, case.target_prompt])
    z = model.encode_images(case.source[None])
    model.use_adapter(lora.FORWARD)
    for t in model.icd.boundaries.forward_schedule()[:-1]:
        z = model.eps(z, t, cond.index([0]), guidance=torch.zeros(1))
    model.use_adapter(lora.REVERSE)
    x = torch.cat([z, z])
    for t in model.icd.boundaries.reverse_schedule()[:-1]:
        x = model.eps(x, t, cond, guidance=torch.zeros(2))
    model.decode_latents(x)
    sync(model.device)
    return time.perf_counter() - t0


def measure_speed(editor: Editor, method: Method, cases: Sequence[BenchCase], *, guidance: float,
                  tau: float | None, shards: Shards) -> list[dict]:
    """Timed single-image edits of this process's share of `cases` (iCD also times its bare network calls)."""

    def run(case: BenchCase) -> dict:
        t = time_edit(editor, method, case, guidance, tau)
        if method.family == "icd":
            t["seconds_bare"] = bare_network_seconds(editor, case)
        return t

    return timed_runs(shards, cases, run)


def strip_images(records: list[dict]) -> tuple[list[dict], list[tuple[dict, np.ndarray]]]:
    """Records without example images, and the (record, image) pairs that carried one."""
    shown = [(r, r["_image"]) for r in records if "_image" in r]
    return [{k: v for k, v in r.items() if k != "_image"} for r in records], shown


def with_method_adapters(editor: Editor, method: Method, adapters: dict[str, str]) -> Editor:
    """The editor for `method`: ``icd:NAME`` gets an editor on those adapters."""
    return editor if method.adapters is None else editor.with_adapters(adapters[method.adapters])
