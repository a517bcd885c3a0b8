"""The measuring harness (``icd bench inversion|editing|generation``): every method on the same cases in one run,
quality against ground truth where the world has it, NFE counted by the model's UNet counter, timings with the
device named, sharded over processes under ``accelerate launch``. Schema of results.json: `icd.bench.results`.

Layout: `cases` (world cases, BenchCase) and `piebench` (PIE-Bench loader and fixture writer) say what is measured;
`methods` parses method names; `editing`, `inversion`, `generation` measure one method on one process's share;
`results` aggregates and validates; `report` writes tables, plots and grids; `harness` runs it all;
`optional_metrics` loads LPIPS / CLIP / DINOv2 when the user has the weights.
"""

from icd.bench.harness import TASKS, BenchOptions, run_bench

__all__ = ["TASKS", "BenchOptions", "run_bench"]
