"""The reviewers' step ablation in one table and one quality-vs-NFE plot: iCD K+K (adapter pairs with K segments,
methods ``icd:NAME`` or the shipped ``icd``) beside DDIM K+K at the same NFE (``ddimK``) and DDIM 50+50, from an
`icd bench inversion` and an `icd bench editing` run over the same methods (docs/RESULTS.md gives the commands).

    python benchmarks/step_ablation.py --inversion out/bench/steps-inversion --editing out/bench/steps-editing \\
        --out out/bench/steps

Writes ``steps.md`` (the table), ``steps.png`` (inversion PSNR and editing ground-truth PSNR against UNet calls) and
``steps.json``, the record of every row's numbers and the run it came from. ``--record steps.json`` starts from such
a record, so a row measured later joins the rows measured before without re-running them (the runs given replace the
record's rows of the same name); docs/experiments/step-ablation.json is the committed record behind RESULTS §10:

    python benchmarks/step_ablation.py --record docs/experiments/step-ablation.json \\
        --inversion out/ref/steps-S3-inversion --editing out/ref/steps-S3-editing --out out/ref/steps

``--inversion`` and ``--editing`` may be given several times (a later run's rows replace an earlier one's).

A method missing from one of the tasks leaves its cells empty ("–").
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from icd.bench.results import write_json
from icd.io import read_json, write_text_atomic

INVERSION = (("psnr", "PSNR dB", 1.0), ("ssim", "SSIM", 1.0), ("ms_ssim", "MS-SSIM", 1.0), ("lpips", "LPIPS", 1.0))
EDITING = (("gt_psnr", "GT PSNR dB", 1.0), ("bg_psnr", "bg PSNR dB", 1.0), ("judge_accuracy", "judge %", 100.0))


KEPT = {"nfe", *(key for key, _, _ in (*INVERSION, *EDITING))}  # what a record keeps of a method's row


def load(folder: str) -> dict:
    """The iCD and DDIM methods of one `icd bench` run folder (a run may hold others, e.g. gddim or npi rows), each
    kept to its NFE, the table's columns and its source."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no results.json (not an `icd bench` run folder)")
    methods = json.loads(path.read_text())["methods"]
    return {name: {**{k: v for k, v in m.items() if k in KEPT}, "source": str(path)} for name, m in methods.items()
            if family(name) in ("icd", "ddim")}


def load_record(path: str | None) -> tuple[dict, dict]:
    """(inversion, editing) rows of a ``steps.json`` record; empty without one."""
    if not path:
        return {}, {}
    try:
        record = read_json(path)
        return dict(record["inversion"]), dict(record["editing"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a steps.json record ({err})") from None


def family(name: str) -> str:
    """'icd' for iCD rows (icd, icd:NAME), 'ddim' for ddimK, else the name itself."""
    if name == "icd" or name.startswith("icd:"):
        return "icd"
    return "ddim" if re.fullmatch(r"ddim\d+", name) else name


def label(name: str, nfe: int) -> str:
    k = nfe // 2
    if family(name) == "icd":
        return f"iCD {k}+{k}" + (" (shipped)" if name == "icd" else f" ({name[4:]})")
    return f"DDIM {k}+{k}" if family(name) == "ddim" else name


def cell(methods: dict, name: str, key: str, scale: float) -> str:
    value = methods.get(name, {}).get(key)
    if value is None:
        return "–"
    return f"{scale * value:.1f}" if scale != 1.0 else (f"{value:.2f}" if key.endswith("psnr") else f"{value:.4f}")


def table(inv: dict, edit: dict) -> str:
    names = list(dict.fromkeys([*inv, *edit]))
    nfe = {n: (inv.get(n) or edit[n])["nfe"] for n in names}
    names.sort(key=lambda n: (nfe[n], family(n) != "icd", n))
    inv_cols = [c for c in INVERSION if any(c[0] in m for m in inv.values())]
    head = ["method", "NFE", *[f"inversion {c[1]}" for c in inv_cols], *[f"editing {c[1]}" for c in EDITING]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        row = [label(n, nfe[n]), str(nfe[n]), *[cell(inv, n, k, s) for k, _, s in inv_cols],
               *[cell(edit, n, k, s) for k, _, s in EDITING]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(inv: dict, edit: dict, path: Path) -> None:
    import matplotlib  # plotting only here: the table needs none of it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the Agg backend

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, methods, key, title in ((axes[0], inv, "psnr", "inversion: PSNR dB"),
                                    (axes[1], edit, "gt_psnr", "editing: ground-truth PSNR dB")):
        for fam, style, name in (("icd", "o-", "iCD K+K"), ("ddim", "s--", "DDIM K+K")):
            rows = sorted((m["nfe"], m[key]) for n, m in methods.items()
                          if family(n) == fam and key in m and (fam == "icd" or m["nfe"] < 100))
            if rows:
                ax.plot(*zip(*rows), style, label=name)
        if "ddim50" in methods and key in methods["ddim50"]:
            ax.axhline(methods["ddim50"][key], color="gray", ls=":", label="DDIM 50+50 (100 NFE)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("UNet calls per image (invert + decode)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inversion", action="append", default=[],
                    help="folder of an `icd bench inversion` run (repeatable: later runs' rows win)")
    ap.add_argument("--editing", action="append", default=[],
                    help="folder of an `icd bench editing` run (repeatable: later runs' rows win)")
    ap.add_argument("--record", help="a steps.json written before: its rows, then the runs' rows over them")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not (args.inversion or args.editing or args.record):
        ap.error("give --inversion, --editing, --record or several")
    inv, edit = load_record(args.record)
    for folder in args.inversion:
        inv.update(load(folder))
    for folder in args.editing:
        edit.update(load(folder))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(inv, edit)
    write_text_atomic(out / "steps.md", text)
    write_json(out / "steps.json", {"inversion": inv, "editing": edit})
    plot(inv, edit, out / "steps.png")
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
