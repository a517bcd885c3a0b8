"""Merge method rows of several `icd bench` results.json files into one (for plots of rows measured in different
runs, e.g. docs/experiments/editing-baselines.md), recording which row came from which file, and draw the plots.

usage: python benchmarks/merge_results.py out/bench/editing-run2/results.json:icd,ddim50,nti50 \\
           out/bench/editing/results.json:ddim4,npi50 --out out/bench/editing-combined
The first file gives the top-level fields; rows keep the given order.
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
    args = ap.parse_args()
    merged, sources = None, {}
    for part in args.parts:
        path, _, names = part.rpartition(":")
        data = json.loads(Path(path).read_text())
        if merged is None:
            merged = {**data, "methods": {}}
        for name in names.split(","):
            if name not in data["methods"]:
                raise SystemExit(f"{path} has no method {name!r}")
            merged["methods"][name] = data["methods"][name]
        sources[path] = names.split(",")
    merged["merged_from"] = sources
    validate(merged)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", merged)
    plots(merged, out)
    print(f"wrote {out / 'results.json'} and plots")


if __name__ == "__main__":
    main()
