"""Measure editing on the embedded model (issue: editing): quality per edit kind against the world's ground truth,
and speed, for iCD and the baselines on the same model, API and controls.

usage: python benchmarks/embedded_editing.py [--n 100] [--methods icd,ddim50,ddim4,npi,nti] [--w 1] --out DIR

Quality: for each kind (color, shape, background: P2P word swap with local blend; size: MasaCtrl), `--n` held-out
cases; bg_psnr / bg_ssim outside the case's mask (pixels the edit may not change) against the source, gt_psnr /
gt_ssim against the exactly rendered target, judge accuracy against the target caption. Images are edited in
batches (one UNet call per step for the whole batch of [sources, targets]).
Speed: `--n-timing` single-image edits per method, median seconds of inversion and editing, and for iCD the bare
network evaluations it cannot avoid (text encoder, VAE encode + decode, its UNet calls at the same batch sizes).
Writes DIR/results.json, DIR/results.md and example grids.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.editor import EditControls, Editor
from icd.imageio import save_image
from icd.judge import JudgeScorer
from icd.metrics import psnr, ssim
from icd.models import lora
from icd.plotting import captioned_grid

SEEDS_EDIT = world.EVAL_SEED_START + 500_000
METHODS = {"icd": ("icd", None), "ddim50": ("ddim", 50), "ddim4": ("ddim", 4), "npi": ("npi", 50),
           "nti": ("nti", 50)}
# Prompt-to-Prompt settings per method (method.md §8.2 for iCD; baselines.md §3-4 for NPI / NTI; DDIM as NPI)
P2P = {"icd": dict(cross_replace=0.3, self_replace=0.6, reweight_new_words=4.0),
       "ddim": dict(cross_replace=0.2, self_replace=0.5, reweight_new_words=3.0),
       "npi": dict(cross_replace=0.2, self_replace=0.5, reweight_new_words=3.0),
       "nti": dict(cross_replace=0.4, self_replace=0.8, reweight_new_words=3.0)}


def controls_for(method: str, cases: list[world.EditCase], w: float) -> EditControls:
    """One batch of cases of one kind: P2P with each case's blend words, or MasaCtrl for size edits."""
    if cases[0].kind == "size":
        return EditControls(guidance=w, p2p=None, masactrl=MasaCtrlControls())
    blend = [((c.blend_words[0],), (c.blend_words[1],)) for c in cases]
    return EditControls(guidance=w, p2p=P2PControls(**P2P[method], blend_words=blend))


def run_kind(editor: Editor, judge, name: str, steps: int | None, cases, w: float, batch: int) -> dict:
    """One method family (icd | ddim | npi | nti) on the cases of one kind, in batches."""
    edits, recons = [], []
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        sources = np.stack([c.source for c in chunk])
        inv = editor.invert(sources, [c.source_prompt for c in chunk], method=name, steps=steps, guidance=w)
        out = editor.edit(inv, [c.target_prompt for c in chunk], controls_for(name, chunk, w))
        edits.append(out.images)
        recons.append(out.reconstructions)
    edited, recon = np.concatenate(edits), np.concatenate(recons)
    src = np.stack([c.source for c in cases])
    tgt = np.stack([c.target for c in cases])
    outside = ~np.stack([c.mask for c in cases])
    return {"n": len(cases), "gt_psnr": float(psnr(tgt, edited).mean()), "gt_ssim": float(ssim(tgt, edited).mean()),
            "bg_psnr": float(psnr(src, edited, outside).mean()), "bg_ssim": float(ssim(src, edited, outside).mean()),
            "recon_psnr": float(psnr(src, recon).mean()),
            "judge_accuracy": judge.score(edited, [c.target_prompt for c in cases])["exact"], "_images": edited}


def time_one(editor: Editor, method: str, steps: int | None, case, w: float) -> dict:
    name = METHODS[method][0]
    model = editor._for(name)
    model.counter.reset()
    t0 = time.perf_counter()
    inv = editor.invert(case.source[None], [case.source_prompt], method=name, steps=steps, guidance=w)
    t1 = time.perf_counter()
    out = editor.edit(inv, [case.target_prompt], controls_for(name, [case], w))
    t2 = time.perf_counter()
    return {"seconds_invert": t1 - t0, "seconds_edit": t2 - t1, "seconds": t2 - t0, "nfe": model.counter.calls,
            "nfe_edit": out.nfe}


@torch.no_grad()
def bare_icd_seconds(editor: Editor, case) -> float:
    """The network evaluations an iCD edit of one image cannot avoid, timed alone: text encoder (source and
    target), VAE encode, 4 forward UNet calls at batch 1, 4 reverse calls at batch 2, VAE decode at batch 2."""
    model = editor.icd_model
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
    return time.perf_counter() - t0


def markdown(r: dict) -> str:
    lines = [f"device: {r['device']}, torch {r['torch']}, n = {r['n']} cases per kind, w = {r['w']}", "",
             "| method | NFE / edit | median s invert | median s edit | median s total | kind | bg PSNR | bg SSIM "
             "| GT PSNR | GT SSIM | judge % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        for kind, v in m["per_kind"].items():
            lines.append(f"| {name} | {m['nfe']} | {m['seconds_invert']:.3f} | {m['seconds_edit']:.3f} "
                         f"| {m['seconds_per_image']:.3f} | {kind} | {v['bg_psnr']:.2f} | {v['bg_ssim']:.4f} "
                         f"| {v['gt_psnr']:.2f} | {v['gt_ssim']:.4f} | {100 * v['judge_accuracy']:.1f} |")
        lines.append(f"| {name} | | | | | **all** | {m['bg_psnr']:.2f} | {m['bg_ssim']:.4f} | {m['gt_psnr']:.2f} "
                     f"| {m['gt_ssim']:.4f} | {100 * m['judge_accuracy']:.1f} |")
    if "bare_icd_seconds" in r:
        lines += ["", f"iCD edit of one image: {r['methods']['icd']['seconds_per_image']:.3f} s median; the bare "
                  f"network evaluations alone: {r['bare_icd_seconds']:.3f} s (ratio "
                  f"{r['methods']['icd']['seconds_per_image'] / r['bare_icd_seconds']:.2f})."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--methods", default="icd,ddim50,ddim4,npi,nti")
    ap.add_argument("--kinds", default=",".join(world.EDIT_KINDS))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--n-timing", type=int, default=5)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--w", type=float, default=1.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    editor = Editor.from_pretrained(args.model)
    judge = JudgeScorer.load(None)
    kinds = args.kinds.split(",")
    cases = {k: [world.make_case(k, SEEDS_EDIT + 1000 * j + i) for i in range(args.n)]
             for j, k in enumerate(kinds)}
    results = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "n": args.n, "seed_start": SEEDS_EDIT, "w": args.w, "methods": {}}
    timing_cases = [world.make_case("color", SEEDS_EDIT + 900_000 + i) for i in range(args.n_timing)]
    for method in args.methods.split(","):
        name, steps = METHODS[method]
        per_kind, shown = {}, []
        for kind in kinds:
            t0 = time.perf_counter()
            r = run_kind(editor, judge, name, steps, cases[kind], args.w, args.batch)
            shown.append((kind, r.pop("_images")[:6]))
            per_kind[kind] = r
            print(method, kind, r, f"{time.perf_counter() - t0:.0f} s", flush=True)
        timings = [time_one(editor, method, steps, c, args.w) for c in timing_cases]
        entry = {k: float(np.mean([v[k] for v in per_kind.values()]))
                 for k in ("gt_psnr", "gt_ssim", "bg_psnr", "bg_ssim", "recon_psnr", "judge_accuracy")}
        entry.update(nfe=timings[0]["nfe"], nfe_edit=timings[0]["nfe_edit"],
                     seconds_per_image=statistics.median(t["seconds"] for t in timings),
                     seconds_invert=statistics.median(t["seconds_invert"] for t in timings),
                     seconds_edit=statistics.median(t["seconds_edit"] for t in timings),
                     seconds_spread=[min(t["seconds"] for t in timings), max(t["seconds"] for t in timings)],
                     per_kind=per_kind)
        results["methods"][method] = entry
        print(method, {k: v for k, v in entry.items() if k != "per_kind"}, flush=True)
        grid = [img for kind, imgs in shown for img in imgs]
        labels = [f"{method} {kind}: {c.target_prompt}" for kind, imgs in shown for c in cases[kind][:len(imgs)]]
        save_image(captioned_grid(grid, labels, cols=6), out / f"examples-{method}.png")
    if "icd" in results["methods"]:
        results["bare_icd_seconds"] = statistics.median(bare_icd_seconds(editor, c) for c in timing_cases)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
