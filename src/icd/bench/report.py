"""results.md tables, PNG plots (matplotlib, Agg backend) and example grids from a results dict."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from icd.imageio import save_image
from icd.methods import REGISTRY
from icd.plotting import captioned_grid

_LABELS = {"psnr": "PSNR", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "gt_psnr": "GT PSNR", "gt_ssim": "GT SSIM",
           "bg_psnr": "bg PSNR", "bg_ssim": "bg SSIM", "judge_accuracy": "judge %", "lpips": "LPIPS",
           "bg_lpips": "bg LPIPS", "clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO",
           "background_accuracy": "background %", "count_accuracy": "count %", "psnr_min": "PSNR min",
           "gt_psnr_min": "GT PSNR min", "mse_student_vs_cfg": "MSE student vs CFG",
           "mse_cfg_vs_true_noise": "MSE CFG vs true noise", "mse_unguided_vs_cfg": "MSE unguided vs CFG"}
_ORDER = list(_LABELS)
QUALITY = {"editing": ("gt_psnr", "bg_psnr", "psnr"), "inversion": ("psnr",), "generation": ("judge_accuracy",),
           "guidance": ("mse_student_vs_cfg",)}


def _fmt(key: str, v: float) -> str:
    if key.endswith("accuracy"):
        return f"{100 * v:.1f}"
    if "psnr" in key:
        return f"{v:.2f}"
    if key.startswith("mse"):
        return f"{v:.5f}"
    return f"{v:.4f}"


def _metrics(results: dict) -> list[str]:
    present = {k for m in results["methods"].values() for kd in m["per_kind"].values() for k in kd}
    return [k for k in _ORDER if k in present]


def markdown(results: dict) -> str:
    r = results
    renoise = f", renoise = {r['renoise']}" if r.get("renoise") else ""
    head = (f"task: {r['task']}, model: {r.get('model')}, cases: {r.get('cases')}, n = {r['n']}"
            f"{' per kind' if r['task'] != 'inversion' else ''}, seed_start = {r['seed_start']}, "
            f"guidance w = {r.get('guidance')}, tau = {r.get('tau')}{renoise}; "
            f"device: {r['device']}, torch {r['torch']}, "
            f"{r.get('processes', 1)} process(es)")
    metrics = _metrics(r)
    lines = [head, "", "| method | NFE | median s / image | s invert | s edit/decode | kind | n | "
             + " | ".join(_LABELS[k] for k in metrics) + " |", "|" + "---|" * (6 + len(metrics) + 1)]
    for name, m in r["methods"].items():
        second = m.get("seconds_edit", m.get("seconds_decode"))
        timing = (f"{m['nfe']} | {m['seconds_per_image']:.3f} | "
                  + (f"{m['seconds_invert']:.3f}" if "seconds_invert" in m else "") + " | "
                  + (f"{second:.3f}" if second is not None else ""))
        blank = " | ".join([""] * 4)
        for kind, v in m["per_kind"].items():
            lines.append(f"| {name} | {blank} | {kind} | {v['n']} | "
                         + " | ".join(_fmt(k, v[k]) if k in v else "" for k in metrics) + " |")
        n_all = sum(v["n"] for v in m["per_kind"].values())
        lines.append(f"| **{name}** | {timing} | **all** | {n_all} | "
                     + " | ".join(_fmt(k, m[k]) if k in m else "" for k in metrics) + " |")
    speed = [(n, m) for n, m in r["methods"].items()]
    if r["task"] == "editing" and "icd" in r["methods"]:
        icd = r["methods"]["icd"]
        lines += ["", "Speed-up of an iCD edit over each method (ratio of median seconds per image):", ""]
        lines += [f"- {n}: {m['seconds_per_image'] / icd['seconds_per_image']:.1f}x" for n, m in speed if n != "icd"]
        if "seconds_bare" in icd:
            lines.append(f"- icd: {icd['seconds_per_image']:.3f} s per edit; its bare network evaluations alone "
                         f"{icd['seconds_bare']:.3f} s (ratio {icd['seconds_per_image'] / icd['seconds_bare']:.2f})")
    if r.get("skipped_metrics"):
        lines += ["", "Skipped metrics:", ""] + [f"- {s['metric']}: {s['reason']}" for s in r["skipped_metrics"]]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[Path]:
    """quality-vs-NFE.png, seconds.png and per-kind.png; returns the files written."""
    import matplotlib  # optional and slow to import: only a run that writes plots needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    methods = results["methods"]
    names = list(methods)
    key = next(k for k in QUALITY[results["task"]] if all(k in m for m in methods.values()))
    label = _LABELS[key]
    scale = 100.0 if key.endswith("accuracy") else 1.0
    written = []

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    families: dict[str, list[str]] = {}
    free = [m.name for m in REGISTRY if not (m.own_steps or m.takes_strength)]  # names that take a step count
    stepped = re.compile(f"({'|'.join(re.escape(n) for n in free)})(\\d+)")
    for n in names:  # ddim1, ddim2, ... form one curve (the step ablation); other methods are single points
        m = stepped.fullmatch(n)
        families.setdefault(m.group(1) if m else n, []).append(n)
    if len(families) > len(plt.rcParams["axes.prop_cycle"]):  # more series than default colours: none repeats
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for family, members in families.items():
        members = sorted(members, key=lambda n: methods[n]["nfe"])
        xs, ys = [methods[n]["nfe"] for n in members], [scale * methods[n][key] for n in members]
        if len(members) > 1:
            ax.plot(xs, ys, marker="o", label=f"{family} ({', '.join(n[len(family):] for n in members)} steps)")
        else:
            ax.scatter(xs, ys, label=family, zorder=3, marker="*", s=90)
    ax.legend(fontsize=7, loc="best")
    if any(methods[n]["nfe"] <= 0 for n in names):  # the vae method costs no UNet call: linear near 0
        ax.set_xscale("symlog", linthresh=1)
    else:
        ax.set_xscale("log")
    ax.set_xlabel("UNet calls per image (counted)")
    ax.set_ylabel(label)
    ax.set_title(f"{results['task']}: {label} vs NFE")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "quality-vs-nfe.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    med = [methods[n]["seconds_per_image"] for n in names]
    lo = [med[i] - methods[n]["seconds_spread"][0] for i, n in enumerate(names)]
    hi = [methods[n]["seconds_spread"][1] - med[i] for i, n in enumerate(names)]
    ax.bar(names, med, yerr=[lo, hi], capsize=3)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per image (median, min-max)")
    ax.set_title(results["device"], fontsize=8)
    fig.tight_layout()
    written.append(out / "seconds.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    kinds = list(dict.fromkeys(k for n in names for k in methods[n]["per_kind"]))
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(kinds) * max(1, len(names)) / 3), 3.5))
    width = 0.8 / len(names)
    for j, n in enumerate(names):
        vals = [scale * methods[n]["per_kind"].get(k, {}).get(key, np.nan) for k in kinds]
        ax.bar(np.arange(len(kinds)) + j * width, vals, width, label=n)
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "per-kind.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def example_grid(shown: dict[str, list[tuple[dict, np.ndarray]]],
                 sources: dict[str, tuple[np.ndarray, str, np.ndarray | None]], out: Path) -> Path:
    """Rows = example cases: source, the rendered target when known, then one column per method."""
    names = list(shown)
    by_case: dict[str, dict[str, np.ndarray]] = {}
    for n in names:
        for rec, img in shown[n]:
            by_case.setdefault(rec["case_id"], {})[n] = img
    with_target = any(sources[c][2] is not None for c in by_case)
    images, captions = [], []
    for case_id, imgs in by_case.items():
        src, text, target = sources[case_id]
        images.append(src)
        captions.append(f"{case_id}: {text}")
        if with_target:
            images.append(target if target is not None else np.full_like(src, 255))
            captions.append("ground truth")
        for n in names:
            images.append(imgs.get(n, np.full_like(src, 255)))
            captions.append(n)
    path = out / "examples.png"
    save_image(captioned_grid(images, captions, cols=len(names) + 1 + with_target), path)
    return path
