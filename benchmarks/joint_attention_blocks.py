"""Which joint-attention blocks to control on the embedded flow model (docs/flow.md, "Attention control on joint
attention"): held-out world edit cases (`icd bench editing`'s seeds, `icd.bench.cases.world_cases`), inverted once
per kind with flow-ODE (Euler) inversion (method ``ddim`` on a flow model), then edited with each choice under the
bench's own controls (`icd.bench.editing.controls_for`: P2P at the DDIM family's settings with the cases' blend
words for rigid kinds, MasaCtrl for ``size``) and scored with the bench's own metrics (`case_metrics`: edit
ground-truth PSNR, background PSNR; `judge_correct`: judge accuracy).

P2P kinds (color, shape, background) compare ``P2PControls.blocks``: ``all``, ``double``, ``single`` and no
attention control at all (``swap``: the plain prompt swap, the reference point). MasaCtrl kinds (size) compare
``MasaCtrlControls.start_layer`` (blocks in transformer order, double-stream first) and ``swap``.

    python benchmarks/joint_attention_blocks.py --n 20 --steps 50 --threads 1 --out out/bench/joint-attention-blocks

``--vital N`` instead measures Stable Flow's layer importance (Avrahami et al., CVPR 2025, §3.1: bypass one layer,
compare the generation with the full model's) for each block of the transformer: N held-out captions (the editing
cases' source prompts) generated with the flow ODE from fixed seeds, once with all blocks and once with each block
bypassed (its output = its input), scored by PSNR against the full model's image and by how often the judge's
reading changes (a stand-in for Stable Flow's DINOv2 similarity).

    python benchmarks/joint_attention_blocks.py --vital 40 --steps 50 --threads 1 --out out/bench/joint-attention-vital
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from icd.bench.cases import world_cases
from icd.bench.editing import NON_RIGID_KINDS, case_metrics, controls_for, judge_correct
from icd.editing.edit import EditControls
from icd.io import write_text_atomic
from icd.judge import JudgeScorer
from icd.pipeline import Pipeline
from icd.world import EDIT_KINDS

METRICS = ("gt_psnr", "bg_psnr", "judge_accuracy", "psnr")


def choices_for(kind: str, base: EditControls, n_blocks: int, n_double: int, starts: list[int]) -> dict:
    """{label: EditControls} for one kind: the block choices of its control, and the plain swap."""
    out = {"swap": EditControls(guidance=base.guidance, tau=base.tau, p2p=None)}
    if kind in NON_RIGID_KINDS:
        for s in starts:
            if 0 <= s < n_blocks:
                out[f"masactrl from block {s}"] = replace(base, masactrl=replace(base.masactrl, start_layer=s))
    else:
        for blocks in ("all", "double", "single"):
            out[f"p2p {blocks}"] = replace(base, p2p=replace(base.p2p, blocks=blocks))
    return out


def vital_blocks(pipe: Pipeline, judge, n: int, steps: int, guidance: float | None) -> tuple[dict, str]:
    """Stable Flow's bypass test per block (module docstring): {block label: metrics} and a markdown table."""
    from icd.imageio import to_uint8
    from icd.metrics import psnr
    from icd.world import parse_caption

    prompts = [c.source_prompt for c in world_cases(EDIT_KINDS, -(-n // len(EDIT_KINDS)))][:n]
    transformer = pipe.model.unet
    blocks = [(f"double {i}", b) for i, b in enumerate(transformer.transformer_blocks)] + \
        [(f"single {i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]

    def generate():
        return to_uint8(pipe.generate(prompts, method="ddim", steps=steps, guidance=guidance, seed=0).images)

    full = generate()
    full_read = judge.read(full)
    exact = [r == parse_caption(p) for r, p in zip(full_read, prompts)]
    rows = {"none (full model)": {"psnr_vs_full": None, "reading_changed": 0.0, "judge_exact": float(np.mean(exact))}}
    for index, (label, block) in enumerate(blocks):
        bypass = block.register_forward_hook(
            lambda m, args, kwargs, out: (kwargs["encoder_hidden_states"], kwargs["hidden_states"]), with_kwargs=True)
        try:
            images = generate()
        finally:
            bypass.remove()
        read = judge.read(images)
        rows[f"{index}: {label}"] = {
            "psnr_vs_full": float(np.mean(psnr(full, images))),
            "reading_changed": float(np.mean([a != b for a, b in zip(read, full_read)])),
            "judge_exact": float(np.mean([r == parse_caption(p) for r, p in zip(read, prompts)]))}
    lines = ["| bypassed block (index: stream k) | PSNR vs full model | judge reading changed % | judge exact % |",
             "|---|---|---|---|"]
    for label, v in rows.items():
        p = "–" if v["psnr_vs_full"] is None else f"{v['psnr_vs_full']:.2f}"
        lines.append(f"| {label} | {p} | {100 * v['reading_changed']:.1f} | {100 * v['judge_exact']:.1f} |")
    return rows, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded-flow")
    ap.add_argument("--kinds", default="color,shape,background,size")
    ap.add_argument("--n", type=int, default=20, help="cases per kind")
    ap.add_argument("--steps", type=int, default=50, help="Euler steps of the inversion and of the edit")
    ap.add_argument("--guidance", type=float, default=None, help="guidance code w (default: the method's)")
    ap.add_argument("--starts", default="0,2,4", help="MasaCtrl start blocks to compare (size cases)")
    ap.add_argument("--batch", type=int, default=10, help="cases per edit batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="out/bench/joint-attention-blocks")
    ap.add_argument("--vital", type=int, default=0, help="run Stable Flow's bypass test on N prompts instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = Pipeline.from_pretrained(args.model)
    if args.vital:
        t0 = time.perf_counter()
        rows, report = vital_blocks(pipe, JudgeScorer.load(), args.vital, args.steps, args.guidance)
        report = (f"model {args.model}, {args.vital} held-out captions, ddim (Euler flow ODE) {args.steps} steps, "
                  f"guidance {args.guidance if args.guidance is not None else 'method default'}, threads "
                  f"{args.threads}, {time.perf_counter() - t0:.0f} s\n\n{report}")
        print(report)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "results.json", json.dumps({"args": vars(args), "blocks": rows}, indent=1) + "\n")
        write_text_atomic(out / "table.md", report + "\n")
        return
    layers = pipe.attention(pipe.model)
    n_blocks, n_double = len(layers.infos), getattr(layers, "num_double", 0)
    judge = JudgeScorer.load()
    starts = [int(s) for s in args.starts.split(",") if s]
    records: list[dict] = []
    t0 = time.perf_counter()
    kinds = args.kinds.split(",")
    every = world_cases(EDIT_KINDS, args.n)  # `icd bench editing`'s cases: its kind j from seed_start + 1000 j
    for kind in kinds:
        cases = [c for c in every if c.kind == kind]
        for lo in range(0, len(cases), args.batch):
            part = cases[lo:lo + args.batch]
            inv = pipe.invert(np.stack([c.source for c in part]), [c.source_prompt for c in part], method="ddim",
                              steps=args.steps, guidance=args.guidance)
            base = controls_for("ddim", part, args.guidance, None)
            for label, controls in choices_for(kind, base, n_blocks, n_double, starts).items():
                out = pipe.edit(inv, [c.target_prompt for c in part], controls)
                rows = case_metrics(part, out.images, out.reconstructions)
                for row, ok, c in zip(rows, judge_correct(judge, part, out.images), part):
                    if ok is not None:
                        row["judge_accuracy"] = ok
                    records.append({"case": c.case_id, "kind": kind, "choice": label, **row})
            print(f"{kind} {lo + len(part)}/{len(cases)}  {time.perf_counter() - t0:.0f} s", flush=True)

    summary: dict = {}
    for r in records:
        cell = summary.setdefault(r["kind"], {}).setdefault(r["choice"], {m: [] for m in METRICS})
        for m in METRICS:
            if m in r:
                cell[m].append(r[m])
    table = {kind: {choice: {m: float(np.mean(v)) if v else None for m, v in cell.items()} | {"n": len(cell["psnr"])}
                    for choice, cell in choices.items()} for kind, choices in summary.items()}
    rigid = [k for k in table if k not in NON_RIGID_KINDS]
    if rigid:  # the P2P choices over all rigid kinds
        table["rigid (all P2P kinds)"] = {}
        for choice in table[rigid[0]]:
            cells = [summary[k][choice] for k in rigid]
            table["rigid (all P2P kinds)"][choice] = {
                m: float(np.mean(sum((c[m] for c in cells), []))) if any(c[m] for c in cells) else None
                for m in METRICS} | {"n": sum(len(c["psnr"]) for c in cells)}
    lines = [f"model {args.model}, {args.n} cases per kind, ddim (Euler flow-ODE) {args.steps}+{args.steps} steps, "
             f"guidance {args.guidance if args.guidance is not None else 'method default'}, threads {args.threads}, "
             f"{time.perf_counter() - t0:.0f} s", "",
             "| kind | control | n | edit GT PSNR | background PSNR | judge % | reconstruction PSNR |",
             "|---|---|---|---|---|---|---|"]
    for kind, choices in table.items():
        for choice, v in choices.items():
            def f(x, pct=False):
                return "–" if x is None else f"{100 * x:.1f}" if pct else f"{x:.2f}"
            lines.append(f"| {kind} | {choice} | {v['n']} | {f(v['gt_psnr'])} | {f(v['bg_psnr'])} | "
                         f"{f(v['judge_accuracy'], True)} | {f(v['psnr'])} |")
    report = "\n".join(lines)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps({"args": vars(args), "table": table, "records": records},
                                                       indent=1) + "\n")
    write_text_atomic(out / "table.md", report + "\n")


if __name__ == "__main__":
    main()
