"""The worst held-out edits of each kind for two methods, with their measured causes and the settings that fix them
(docs/experiments/failure-cases.md).

On the cases of `icd bench editing --n N` (the same held-out seeds, batches and controls: the bench's own
`measure_quality`, whose per-case records and images this script keeps):

1. **records**: every case's GT PSNR, background PSNR, in-mask PSNR, judge verdict and reading, and the case's
   facts (objects in the scene, the edited object's size, whether the blend word names both objects), per method;
   their means equal the bench's `results.json` (`--bench` checks it);
2. **paired**: method A − method B per case (GT PSNR, background PSNR, judge), mean with its 95 % t interval,
   per kind and over all cases;
3. **groups**: mean GT PSNR by the case facts above (the measured causes at the population level);
4. **worst**: the `--worst` lowest-GT-PSNR cases of each kind for each method, each rerun alone with its default
   controls and with every setting of `VARIANTS` that applies to its kind; the best variant is then run on all the
   kind's cases (does the setting fix the kind or only that image?);
5. one PNG grid per kind (source | ground truth | A | B | A's and B's best variant) and `summary.json`.

    python benchmarks/failure_cases.py --n 100 --methods icd,renoise-4call --worst 2 --threads 1 \
        --out out/failure-cases --docs docs/experiments/failure-cases \
        --bench out/bench/renoise-edit100/results.json

Records are cached in `--out` (`records-<method>.json`, `images-<method>.npz`): a second run with the same
`--n` only redraws the grids and reruns the variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.bench import editing
from icd.bench.cases import SEED_START, BenchCase, world_cases
from icd.bench.methods import BenchMethod, parse_methods
from icd.bench.runtime import Shards, strip_images
from icd.bench.task import RunContext
from icd.imageio import save_image
from icd.io import write_text_atomic
from icd.judge import JudgeScorer
from icd.metrics import psnr
from icd.pipeline import Pipeline
from icd.plotting import captioned_grid

METRICS = ("gt_psnr", "bg_psnr", "judge_accuracy")
# settings a failing case is rerun with: guidance code w, and fields of the P2P / MasaCtrl controls (a variant
# applies to a kind when its controls are the kind's: P2P for rigid kinds, MasaCtrl for size; "p2p" switches a
# non-rigid case to Prompt-to-Prompt with the method's defaults)
VARIANTS: dict[str, dict] = {
    "w 0.5": {"guidance": 0.5},
    "w 2": {"guidance": 2.0},
    "w 3": {"guidance": 3.0},
    "w 7": {"guidance": 7.0},  # CFG 8, the paper's SD 1.5 scale
    "cross 0.6": {"p2p": {"cross_replace": 0.6}},
    "cross 0": {"p2p": {"cross_replace": 0.0}},
    "self 0.3": {"p2p": {"self_replace": 0.3}},
    "self 0.9": {"p2p": {"self_replace": 0.9}},
    "blend 0.15": {"p2p": {"blend_threshold": 0.15}},
    "blend 0.5": {"p2p": {"blend_threshold": 0.5}},
    "no blend": {"p2p": {"blend_words": None}},
    "reweight 1": {"p2p": {"reweight_new_words": None}},
    "reweight 8": {"p2p": {"reweight_new_words": 8.0}},
    "masactrl t 500": {"masactrl": {"start_t": 500}},
    "masactrl t 999": {"masactrl": {"start_t": 999}},
    "p2p": {"control": "p2p"},
}
CASE_FIELDS = ("gt_psnr", "bg_psnr", "in_psnr", "layout_iou", "judge_accuracy", "objects", "mask_fraction",
               "edited_size", "blend_word_shared", "background_change")
MIN_GAIN_DB = 1.0  # a variant "fixes" a case when it gains at least this much GT PSNR and the judge reads the target


# ------------------------------------------------------------------------------------------------ statistics
def t_quantile(p: float, df: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion around the normal one (error < 1e-4 for df >= 10)."""
    z = math.sqrt(2) * _erfinv(2 * p - 1)
    return (z + (z**3 + z) / 4 / df + (5 * z**5 + 16 * z**3 + 3 * z) / 96 / df**2
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384 / df**3)


def _erfinv(y: float) -> float:
    x = 0.0 if y == 0 else math.copysign(math.sqrt(-math.log((1 - abs(y)) / 2)) * 0.9, y)
    for _ in range(60):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """a − b per case: mean with its 95 % t interval, sd, and the cases where a is above / below b."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    out = {"n": n, "mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "sd": sd,
           "above": int((d > 0).sum()), "below": int((d < 0).sum())}
    if set(np.unique(np.concatenate([np.asarray(a), np.asarray(b)]))) <= {0.0, 1.0}:  # a yes/no metric (judge)
        out["mcnemar_p"] = mcnemar_exact(out["above"], out["below"])
    return out


def mcnemar_exact(above: int, below: int) -> float:
    """Two-sided exact McNemar test of paired yes/no outcomes: the discordant pairs against Binomial(n, 1/2)."""
    n, k = above + below, min(above, below)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


# ------------------------------------------------------------------------------------------------ case facts
def case_facts(case: BenchCase) -> dict:
    """What the case is: objects in the scene, the edited object's size word, and whether the changed word of the
    source prompt (P2P's local-blend word) also names the other object."""
    c = world.make_case(case.kind, case.seed)
    facts = {"objects": len(c.source_scene.objects), "mask_fraction": float(c.mask.mean())}
    changed = [o for o, t in zip(c.source_scene.objects, c.target_scene.objects) if o != t]
    if changed:
        facts["edited_size"] = changed[0].size
    old = c.blend_words[0]
    facts["blend_word_shared"] = bool(case.kind != "background"
                                      and c.source_prompt.split().count(old) > 1)
    if case.kind == "background":
        facts["background_change"] = f"{c.source_scene.background}->{c.target_scene.background}"
    return facts


def layout_iou(case: BenchCase, image: np.ndarray, tolerance: float = 60.0) -> float:
    """IoU of the object pixels (farther than `tolerance` in RGB from the target's background colour) of an edit
    and of the rendered target: 1 when the objects stay where the ground truth has them."""
    bg = np.asarray(world.BACKGROUNDS[world.parse_caption(case.target_prompt).background], dtype=np.float64)

    def objects(img: np.ndarray) -> np.ndarray:
        return np.linalg.norm(img.astype(np.float64) - bg, axis=-1) > tolerance

    a, b = objects(image), objects(case.target)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def reading(judge: JudgeScorer, image: np.ndarray) -> str:
    """The judge's reading of one image as a caption of the world."""
    r = judge.read(image[None])[0]
    return world.caption_of(r.background, r.objects) if r.objects else f"(no object) on a {r.background} background"


def failure_type(case: BenchCase, read: world.SceneAttributes) -> str | None:
    """How the judge's reading of an edit differs from the target caption (None: it reads the target): an object
    lost or added, the background wrong, the edited object wrong, or the other object changed."""
    target = world.parse_caption(case.target_prompt)
    if read == target:
        return None
    if len(read.objects) != len(target.objects):
        return "object lost" if len(read.objects) < len(target.objects) else "object added"
    if read.background != target.background:
        return "background wrong"
    if case.kind == "background":
        return "objects changed"
    c = world.make_case(case.kind, case.seed)
    edited = [t.words for o, t in zip(c.source_scene.objects, c.target_scene.objects) if o != t][0]
    return "other object changed" if edited in read.objects else "edited object wrong"


def failure_types(judge: JudgeScorer, cases: Sequence[BenchCase], images: dict[str, np.ndarray]) -> dict:
    """Per kind, the judge failures of these edits counted by `failure_type`, and by objects in the scene."""
    readings = judge.read(np.stack([images[c.case_id] for c in cases]))
    out: dict = {}
    for case, read in zip(cases, readings):
        kind = out.setdefault(case.kind, {"failures": 0, "by_type": {}, "by_objects": {}})
        t = failure_type(case, read)
        if t is None:
            continue
        n = str(len(world.parse_caption(case.source_prompt).objects))
        kind["failures"] += 1
        kind["by_type"][t] = kind["by_type"].get(t, 0) + 1
        kind["by_objects"][n] = kind["by_objects"].get(n, 0) + 1
    return out


# ------------------------------------------------------------------------------------------------ running
def controls(method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext, variant: dict | None):
    """The bench's controls for `cases` (`editing.controls_for`), changed by `variant` (None: as the bench)."""
    base = editing.controls_for(method.method, cases, ctx.guidance, ctx.tau)
    if not variant:
        return base
    if variant.get("control") == "p2p":
        if base.masactrl is None:
            return None
        fake = [dataclasses.replace(c, kind="p2p") for c in cases]  # any rigid kind: the method's P2P defaults
        return editing.controls_for(method.method, fake, ctx.guidance, ctx.tau)
    out = base
    if "guidance" in variant:
        out = dataclasses.replace(out, guidance=variant["guidance"])
    for field in ("p2p", "masactrl"):
        if field in variant:
            if getattr(out, field) is None:
                return None  # the variant changes controls this kind does not use
            out = dataclasses.replace(out, **{field: dataclasses.replace(getattr(out, field), **variant[field])})
    return out


def run_cases(pipe: Pipeline, method: BenchMethod, cases: Sequence[BenchCase], ctx: RunContext,
              variant: dict | None) -> tuple[list[dict], np.ndarray]:
    """Edit `cases` (one kind) as `editing.edit_batch` does, in batches of `ctx.batch`, with the bench's controls
    changed by `variant`: per-case metric rows and images."""
    rows, images = [], []
    for start in range(0, len(cases), ctx.batch):
        part = list(cases[start:start + ctx.batch])
        inv = pipe.invert(np.stack([c.source for c in part]), [c.source_prompt for c in part], method=method.method,
                          steps=method.steps, guidance=ctx.guidance, strength=method.strength,
                          ddim_rule=ctx.ddim_rule)
        out = pipe.edit(inv, [c.target_prompt for c in part], controls(method, part, ctx, variant))
        metric_rows = editing.case_metrics(part, out.images, out.reconstructions)
        for row, ok in zip(metric_rows, editing.judge_correct(ctx.judge, part, out.images)):
            row["judge_accuracy"] = ok
        rows += metric_rows
        images.append(out.images)
    return rows, np.concatenate(images)


def in_mask_psnr(case: BenchCase, image: np.ndarray) -> float:
    return float(psnr(case.target[None], image[None], case.mask)[0])


def records_for(pipe: Pipeline, method: BenchMethod, cases: list[BenchCase], ctx: RunContext, out: Path,
                n: int) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The bench's per-case records of `method` with every case's edit (cached in `out`)."""
    rec_path, img_path = out / f"records-{method.name}.json", out / f"images-{method.name}.npz"
    if rec_path.is_file() and img_path.is_file():
        cached = json.loads(rec_path.read_text())
        if cached["n"] == n:
            with np.load(img_path) as z:
                return cached["records"], {k: z[k] for k in z.files}
    t0 = time.perf_counter()
    full = dataclasses.replace(ctx, examples=n)  # every case is an "example": its image comes back
    records, shown = strip_images(editing.measure_quality(pipe, method, cases, full))
    images = {r["case_id"]: img for r, img in shown}
    by_id = {c.case_id: c for c in cases}
    for r in records:
        case = by_id[r["case_id"]]
        r["in_psnr"] = in_mask_psnr(case, images[r["case_id"]])
        r["layout_iou"] = layout_iou(case, images[r["case_id"]])
        r.update(case_facts(case))
    seconds = time.perf_counter() - t0
    write_text_atomic(rec_path, json.dumps({"n": n, "method": method.name, "seconds": seconds,
                                            "records": records}, indent=0) + "\n")
    np.savez_compressed(img_path, **images)
    print(f"{method.name}: {len(records)} edits in {seconds:.0f} s", file=sys.stderr, flush=True)
    return records, images


def means(records: Sequence[dict], kinds: Sequence[str]) -> dict:
    def avg(rows, m):
        vals = [r[m] for r in rows if r.get(m) is not None]
        return float(np.mean(vals)) if vals else None

    out = {"all": {m: avg(records, m) for m in METRICS}}
    for k in kinds:
        out[k] = {m: avg([r for r in records if r["kind"] == k], m) for m in METRICS}
    return out


def groups(records: Sequence[dict]) -> dict:
    """Mean GT PSNR (and n) of the cases by each fact, per kind: the population view of a cause."""
    out: dict = {}
    for kind in dict.fromkeys(r["kind"] for r in records):
        rows = [r for r in records if r["kind"] == kind]
        g = {}
        for fact in ("objects", "edited_size", "blend_word_shared", "background_change"):
            values = sorted({str(r.get(fact)) for r in rows if fact in r})
            if len(values) > 1:
                g[fact] = {v: {"n": len(sel), "gt_psnr": float(np.mean([r["gt_psnr"] for r in sel])),
                               "judge": float(np.mean([r["judge_accuracy"] for r in sel])),
                               "layout_iou": float(np.mean([r["layout_iou"] for r in sel]))}
                           for v in values for sel in [[r for r in rows if str(r.get(fact)) == v]]}
        out[kind] = g
    return out


def compare_bench(records: Sequence[dict], bench: dict, name: str, kinds: Sequence[str]) -> float:
    """Largest |difference| between these records' per-kind means and the bench's results.json."""
    entry = bench["methods"][name]
    worst = 0.0
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        for m in ("gt_psnr", "bg_psnr", "judge_accuracy"):
            if m in entry["per_kind"].get(kind, {}):
                worst = max(worst, abs(float(np.mean([r[m] for r in rows])) - entry["per_kind"][kind][m]))
    return worst


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="cases per kind, as `icd bench editing --n`")
    ap.add_argument("--methods", default="icd,renoise-4call", help="two methods: A,B (A − B is the paired gap)")
    ap.add_argument("--kinds", default=",".join(world.EDIT_KINDS))
    ap.add_argument("--worst", type=int, default=2, help="worst cases per kind and method")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS to try")
    ap.add_argument("--no-kind-check", action="store_true", help="skip running each best variant on the whole kind")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bench", help="the bench's results.json of the same cases: check the means agree")
    ap.add_argument("--out", required=True, help="folder for records, summary.json and the grids")
    ap.add_argument("--docs", help="folder to copy the grids to (the failure-cases page's images)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    variants = {name: VARIANTS[name] for name in (v.strip() for v in args.variants.split(",")) if name}
    methods = parse_methods(args.methods, allowed=editing.TASK.methods)
    if len(methods) != 2:
        ap.error("--methods takes two methods, A,B")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    pipe = Pipeline.from_pretrained("embedded")
    ctx = RunContext(guidance=editing.TASK.default_guidance, tau=None, shards=Shards("cpu"), batch=args.batch,
                     progress=False, judge=JudgeScorer.load(None))
    cases = world_cases(kinds, args.n, SEED_START["editing"])
    by_id = {c.case_id: c for c in cases}
    recs, imgs = {}, {}
    for m in methods:
        recs[m.name], imgs[m.name] = records_for(pipe, m, cases, ctx, out, args.n)
    a, b = (m.name for m in methods)
    summary: dict = {"n": args.n, "kinds": kinds, "methods": [a, b], "threads": torch.get_num_threads(),
                     "means": {name: means(r, kinds) for name, r in recs.items()}}
    if args.bench:
        bench = json.loads(Path(args.bench).read_text())
        summary["bench_max_abs_difference"] = {name: compare_bench(r, bench, name, kinds) for name, r in recs.items()}

    # paired A − B by case id
    pairs = {}
    for scope in ("all", *kinds):
        ids = [r["case_id"] for r in recs[a] if scope in ("all", r["kind"])]
        ra = {r["case_id"]: r for r in recs[a]}
        rb = {r["case_id"]: r for r in recs[b]}
        pairs[scope] = {m: paired([ra[i][m] for i in ids], [rb[i][m] for i in ids]) for m in METRICS}
    summary["paired"] = {"a": a, "b": b, **pairs}
    summary["groups"] = {name: groups(r) for name, r in recs.items()}
    summary["judge_failures"] = {name: failure_types(ctx.judge, cases, imgs[name]) for name in recs}

    # worst cases, their reruns with each variant, and each best variant over the whole kind
    worst: dict = {}
    for kind in kinds:
        worst[kind] = []
        for m in methods:
            rows = sorted((r for r in recs[m.name] if r["kind"] == kind), key=lambda r: r["gt_psnr"])[:args.worst]
            for r in rows:
                case = by_id[r["case_id"]]
                entry = {"method": m.name, "case_id": case.case_id, "source_prompt": case.source_prompt,
                         "target_prompt": case.target_prompt, "blend_words": list(case.blend_words),
                         **{k: r[k] for k in CASE_FIELDS if k in r},
                         "reading": reading(ctx.judge, imgs[m.name][case.case_id]),
                         "other": {o.name: {k: next(x for x in recs[o.name] if x["case_id"] == case.case_id)[k]
                                            for k in METRICS} for o in methods if o.name != m.name},
                         "variants": {}}
                for vname, variant in {"default": None, **variants}.items():
                    if controls(m, [case], ctx, variant) is None:
                        continue  # the variant changes controls this kind does not use
                    vrows, vimg = run_cases(pipe, m, [case], ctx, variant)
                    entry["variants"][vname] = {**{k: vrows[0][k] for k in METRICS},
                                                "in_psnr": in_mask_psnr(case, vimg[0]),
                                                "layout_iou": layout_iou(case, vimg[0]),
                                                "reading": reading(ctx.judge, vimg[0]), "_image": vimg[0]}
                base = entry["variants"]["default"]
                fixes = [(v["gt_psnr"], name) for name, v in entry["variants"].items()
                         if name != "default" and v["judge_accuracy"] == 1.0
                         and v["gt_psnr"] >= base["gt_psnr"] + MIN_GAIN_DB]
                entry["fix"] = max(fixes)[1] if fixes else None
                worst[kind].append(entry)
        # does each case's fix hold for the whole kind?
        if not args.no_kind_check:
            for m in methods:
                for name in sorted({e["fix"] for e in worst[kind] if e["method"] == m.name and e["fix"]}):
                    kind_cases = [c for c in cases if c.kind == kind]
                    rows, _ = run_cases(pipe, m, kind_cases, ctx, variants[name])
                    base = {r["case_id"]: r for r in recs[m.name]}
                    on_kind = {"variant": {k: float(np.mean([r[k] for r in rows])) for k in METRICS},
                               "default": means(recs[m.name], [kind])[kind],
                               "variant_minus_default": {k: paired([r[k] for r in rows],
                                                                   [base[c.case_id][k] for c in kind_cases])
                                                         for k in METRICS}}
                    for e in worst[kind]:
                        if e["method"] == m.name and e["fix"] == name:
                            e["fix_on_kind"] = on_kind
    summary["worst"] = worst

    # grids: per kind, one row per worst case: source | ground truth | A | B | the row method's best variant
    grids = []
    for kind in kinds:
        images, captions = [], []
        for e in worst[kind]:
            case = by_id[e["case_id"]]
            images += [case.source, case.target]
            captions += [f"{e['method']} worst {kind}: {case.case_id}", "ground truth"]
            for m in methods:
                r = next(x for x in recs[m.name] if x["case_id"] == case.case_id)
                images.append(imgs[m.name][case.case_id])
                captions.append(f"{m.name}: {r['gt_psnr']:.2f} dB, judge {'ok' if r['judge_accuracy'] else 'no'}")
            if e["fix"]:
                v = e["variants"][e["fix"]]
                images.append(v["_image"])
                captions.append(f"{e['method']}, {e['fix']}: {v['gt_psnr']:.2f} dB, judge "
                                f"{'ok' if v['judge_accuracy'] else 'no'}")
            else:
                images.append(np.full_like(case.source, 255))
                captions.append("no setting fixes it")
        path = out / f"{kind}.png"
        save_image(captioned_grid(images, captions, cols=5, scale=2, text_lines=3), path)
        grids.append(path)
        if args.docs:
            Path(args.docs).mkdir(parents=True, exist_ok=True)
            save_image(captioned_grid(images, captions, cols=5, scale=2, text_lines=3), Path(args.docs) / path.name)
    for kind in kinds:
        for e in worst[kind]:
            for v in e["variants"].values():
                v.pop("_image", None)
    summary["seconds"] = time.perf_counter() - t_start  # this run (cached records not recomputed)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("means", "paired", "bench_max_abs_difference") if k in summary},
                     indent=1))
    return summary


if __name__ == "__main__":
    main()
