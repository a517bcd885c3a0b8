"""The results.json schema (version 1) and the aggregation of per-case records into it.

Top level::

    {"schema_version": 1, "task": "editing" | "inversion" | "generation", "device": "cpu (…, 2 threads)",
     "torch": "2.13.0+cpu", "icd": "0.1.0", "model": "embedded", "n": 100, "seed_start": 1000500000,
     "cases": "world" | "pie-bench:PATH", "kinds": [...], "guidance": 1.0, "tau": null, "renoise": 0.0,
     "ddim_rule": "reference", "compile": null, "processes": 1, "skipped_metrics": [{"metric": "lpips", "reason": "…"}],
     "methods": {NAME: METHOD, ...}}

METHOD holds ``nfe`` (UNet calls per image, counted by the model's NFE counter), ``seconds_per_image`` (median
over the timing images; ``seconds_spread`` = [min, max]), the task's parts (``seconds_invert``, ``seconds_edit``,
``nfe_invert``, ``nfe_edit``), every metric that applies as the mean over cases, and ``per_kind``: {KIND: {"n": …,
metric: mean, …}}. Metric names: ``psnr``, ``ssim``, ``ms_ssim`` (reconstruction vs source), ``gt_psnr``,
``gt_ssim`` (edit vs rendered target), ``bg_psnr``, ``bg_ssim`` (edit vs source outside the mask),
``judge_accuracy`` (the world judge reads the target caption), and when weights are given ``lpips``, ``bg_lpips``,
``clip_t``, ``clip_i``, ``dino``. A metric that could not be computed is absent and listed in
``skipped_metrics`` with the reason; values are never zero-filled.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from icd.io import write_text_atomic

SCHEMA_VERSION = 1
TOP_LEVEL = ("schema_version", "task", "device", "torch", "n", "seed_start", "methods")
METHOD_FIELDS = ("nfe", "seconds_per_image", "per_kind")
TASK_FIELDS = {"editing": ("seconds_invert", "seconds_edit", "psnr", "ssim", "bg_psnr", "bg_ssim"),
               "inversion": ("seconds_invert", "seconds_decode", "psnr", "ssim", "ms_ssim"),
               "generation": ("judge_accuracy",), "guidance": ("mse_student_vs_cfg",)}
MIN_METRICS = ("psnr", "gt_psnr")  # also reported as their worst case, `<metric>_min`
# record keys that are bookkeeping, not metrics
_RECORD_KEYS = {"method", "case_id", "kind", "index"}
TIMING_KEYS = ("seconds", "seconds_bare", "seconds_invert", "seconds_edit", "seconds_decode", "nfe", "nfe_invert",
               "nfe_edit", "nfe_decode", "unet_rows")


def _mean(values: list[float]) -> float:
    return float(math.fsum(values) / len(values))


def summarize(records: Sequence[dict], kinds: Sequence[str]) -> dict[str, Any]:
    """Mean of every metric over all cases and per kind (cases in `records` belong to one method)."""
    records = sorted(records, key=lambda r: r["index"])
    metrics = list(dict.fromkeys(k for r in records for k in r if k not in _RECORD_KEYS and not k.startswith("_")))
    out: dict[str, Any] = _stats(records, metrics)
    out["per_kind"] = {}
    for kind in kinds:
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            out["per_kind"][kind] = {"n": len(rows), **_stats(rows, metrics)}
    return out


def _stats(records: Sequence[dict], metrics: Sequence[str]) -> dict[str, float]:
    """Each metric's mean over `records`, and the worst case of the MIN_METRICS (`<metric>_min`)."""
    out = {m: _mean([r[m] for r in records if m in r]) for m in metrics}
    return out | {f"{m}_min": float(min(r[m] for r in records if m in r)) for m in metrics if m in MIN_METRICS}


def timing_summary(timings: Sequence[dict]) -> dict[str, Any]:
    """Medians of the per-image timing runs; NFE counts must agree across images (they are exact)."""
    out: dict[str, Any] = {}
    for key in TIMING_KEYS:
        values = [t[key] for t in timings if key in t]
        if not values:
            continue
        if key.startswith("nfe"):
            out[key] = values[0] if len(set(values)) == 1 else statistics.median(values)
        else:
            out["seconds_per_image" if key == "seconds" else key] = statistics.median(values)
    secs = [t["seconds"] for t in timings]
    out["seconds_spread"] = [min(secs), max(secs)]
    out["timing_images"] = len(timings)
    return out


def method_entry(records: Sequence[dict], timings: Sequence[dict], kinds: Sequence[str]) -> dict[str, Any]:
    entry = timing_summary(timings)
    entry.update(summarize(records, kinds))
    return entry


def validate(results: dict, task: str | None = None) -> None:
    """Raise ValueError unless `results` has the schema's fields with finite numbers."""
    missing = [k for k in TOP_LEVEL if k not in results]
    if missing:
        raise ValueError(f"results lack {', '.join(missing)}")
    task = task or results["task"]
    for name, m in results["methods"].items():
        need = [k for k in (*METHOD_FIELDS, *TASK_FIELDS.get(task, ())) if k not in m]
        if need:
            raise ValueError(f"method {name}: missing {', '.join(need)}")
        for k, v in m.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"method {name}: {k} = {v}")


def quality_view(results: dict) -> dict:
    """The results without timings and run facts: what a re-run or a sharded run must reproduce exactly."""
    drop_top = {"device", "processes", "command"}
    out = {k: v for k, v in results.items() if k not in drop_top}
    out["methods"] = {name: {k: v for k, v in m.items() if not k.startswith("seconds") and k != "timing_images"}
                      for name, m in results["methods"].items()}
    return out


def write_json(path: Path, results: dict) -> None:
    write_text_atomic(Path(path), json.dumps(results, indent=1) + "\n")
