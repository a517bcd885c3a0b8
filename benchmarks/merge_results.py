"""Merge method rows of several `icd bench` results.json files into one (for plots of rows measured in different
runs, e.g. docs/experiments/editing-baselines.md), recording which row came from which file, and draw the plots.

usage: python benchmarks/merge_results.py out/bench/editing-run2/results.json:icd,ddim50,nti50 \\
           out/bench/editing/results.json:ddim4,npi50 --out out/bench/editing-combined
The first file gives the top-level fields; rows keep the given order.

With --by-kind, the files are editing runs of the same methods on different edit kinds (each run `--kinds K
--seed-start S + 1000 j`, j the kind's place in the full run: the same cases as one run over every kind), and each
method's rows are joined into one: per-kind entries side by side, quality means weighted by each kind's case count,
minima the minimum, NFE and seconds the case-weighted mean:

    python benchmarks/merge_results.py --by-kind out/ref/nti-color/results.json:nti50 \\
        out/ref/nti-shape/results.json:nti50 ... --out out/ref/nti
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from icd.bench.report import plots
from icd.bench.results import validate, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", metavar="FILE:METHOD,…")
    ap.add_argument("--out", required=True)
    ap.add_argument("--by-kind", action="store_true", help="join one method's per-kind runs into one row")
    args = ap.parse_args()
    merged = merge_by_kind(args.parts) if args.by_kind else merge_rows(args.parts)
    validate(merged)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", merged)
    plots(merged, out)
    print(f"wrote {out / 'results.json'} and plots")


def _parts(parts: list[str]):
    for part in parts:
        path, sep, names = part.partition(".json:")
        path += ".json"  # method names may hold a colon (icd:NAME)
        if not sep or not names:
            raise SystemExit(f"expected FILE.json:METHOD[,METHOD...], got {part!r}")
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such results file")
        data = json.loads(Path(path).read_text())
        missing = [n for n in names.split(",") if n not in data["methods"]]
        if missing:
            raise SystemExit(f"{path} has no method {missing[0]!r}")
        yield path, data, names.split(",")


def merge_rows(parts: list[str]) -> dict:
    merged, sources = None, {}
    for path, data, names in _parts(parts):
        if merged is None:
            merged = {**data, "methods": {}}
        for name in names:
            merged["methods"][name] = data["methods"][name]
        sources[path] = names
    merged["merged_from"] = sources
    return merged


def merge_by_kind(parts: list[str]) -> dict:
    runs = list(_parts(parts))
    first = runs[0][1]
    kinds = [k for _, data, _ in runs for k in data["kinds"]]
    if len(set(kinds)) != len(kinds):
        raise SystemExit(f"--by-kind: a kind is in two files ({kinds})")
    for path, data, _ in runs:
        for field in ("task", "model", "n", "cases", "guidance", "tau", "ddim_rule"):
            if data.get(field) != first.get(field):
                raise SystemExit(f"--by-kind: {path} differs from {runs[0][0]} in {field!r}")
    merged = {**first, "kinds": kinds, "methods": {},
              "merged_from": {path: names for path, _, names in runs}}
    for name in runs[0][2]:
        rows = [data["methods"][name] for _, data, names in runs if name in names]
        if len(rows) != len(runs):
            raise SystemExit(f"--by-kind: method {name!r} is not in every file")
        merged["methods"][name] = join_kinds(rows)
    return merged


def join_kinds(rows: list[dict]) -> dict:
    """One method's row from its per-kind rows: case-weighted means, minima of the `_min` fields, NFE rounded."""
    per_kind = {k: v for row in rows for k, v in row["per_kind"].items()}
    weights = [sum(v["n"] for v in row["per_kind"].values()) for row in rows]
    total = sum(weights)
    out: dict = {}
    for key, value in rows[0].items():
        values = [row[key] for row in rows]
        if key == "per_kind":
            out[key] = per_kind
        elif key == "seconds_spread":
            out[key] = [min(v[0] for v in values), max(v[-1] for v in values)]
        elif key == "timing_images":
            out[key] = sum(values)
        elif key.endswith("_min"):
            out[key] = min(values)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            mean = sum(w * v for w, v in zip(weights, values)) / total
            out[key] = round(mean) if isinstance(value, int) else mean
        else:
            out[key] = value
    return out


if __name__ == "__main__":
    main()
