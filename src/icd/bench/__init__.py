"""The measuring harness (``icd bench inversion|editing|generation``): every method on the same cases in one run,
quality against ground truth where the world has it, NFE counted by the model's UNet counter, timings with the
device named, sharded over processes under ``accelerate launch``. Schema of results.json: `icd.bench.results`.

Layout: `cases` (world cases, BenchCase) and `piebench` (PIE-Bench loader and fixture writer) say what is measured;
`methods` parses method names; `editing`, `inversion`, `generation` measure one method on one process's share;
`results` aggregates and validates; `report` writes tables, plots and grids; `harness` runs it all;
`optional_metrics` loads LPIPS / CLIP / DINOv2 when the user has the weights.
"""

__all__ = ["TASKS", "BenchOptions", "run_bench"]


def __getattr__(name: str):
    """`TASKS`, `BenchOptions`, `run_bench` from `harness` on first use: the harness imports torch and the pipeline,
    and a light submodule (`piebench`, `cases`: `icd world pie-bench`) must not pay for them."""
    if name in __all__:
        from icd.bench import harness  # heavy (torch, the pipeline): imported on first use, as said above

        return getattr(harness, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
