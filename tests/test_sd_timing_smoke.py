"""`benchmarks/sd_shaped_timing.py` end to end on the CPU at tiny sizes (the GPU runs it at full size): every editing
row of both families is there with its counted UNet calls, and the ratios are the rows' seconds divided."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sd_shaped_timing.py"
STEPS = 2  # the baselines' steps (NTI: 2 steps x up to 10 inner steps)


def _timing():
    spec = importlib.util.spec_from_file_location("sd_shaped_timing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family, size_args, extra", [
    ("sd15", ["--scale", "20"], ["--skip", "train,b8", "--channels-last"]),
    ("sdxl", ["--tiny"], ["--skip", "b8"]),
])
def test_timing_rows_nfe_and_ratios(tmp_path, family, size_args, extra):
    out = tmp_path / "t.json"
    report = _timing().main(["--device", "cpu", "--family", family, *size_args, "--image-size", "64",
                             "--repeats", "1", "--warmups", "0", "--steps", str(STEPS), *extra, "--out", str(out)])
    assert report == json.loads(out.read_text()) and report["family"] == family and report["running"] is None
    rows = {(r["method"], r["variant"], r["batch"]): r for r in report["edit"]}
    assert set(rows) >= {("icd", "plain", 1), ("ddim", "plain", 1), ("npi", "plain", 1), ("nti", "plain", 1)}
    for (method, _, batch), r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        assert r["total_s"] > 0 and r["per_image_s"] == pytest.approx(r["total_s"] / batch)
        assert r["device"].startswith("cpu") and r["peak_gib"] is None  # peak memory: CUDA only
        if method == "icd":
            assert (r["nfe_invert"], r["nfe_edit"], r["steps"]) == (4, 4, 4)
        elif method in ("ddim", "npi"):
            assert (r["nfe_invert"], r["nfe_edit"]) == (STEPS, STEPS)
    nti = rows["nti", "plain", 1]
    inner = nti["nti_inner_per_timestep"]
    assert len(inner) == STEPS and all(1 <= k <= 10 for k in inner) and nti["nti_inner_steps"] == sum(inner)
    assert nti["nfe_invert"] == STEPS + 2 * STEPS + sum(inner)  # DDIM inversion + (cond, inner..., final) per step
    t = {m: rows[m, "plain", 1]["total_s"] for m in ("icd", "ddim", "npi", "nti")}
    ratios = report["ratios"]
    assert ratios[f"icd/ddim{STEPS}"] == pytest.approx(t["icd"] / t["ddim"])
    assert ratios[f"icd/npi{STEPS}"] == pytest.approx(t["icd"] / t["npi"])
    assert ratios["nti/icd"] == pytest.approx(t["nti"] / t["icd"])
    if family == "sd15":
        cl = rows["icd", "channels_last", 1]
        assert cl["speedup_vs_plain"] == pytest.approx(t["icd"] / cl["total_s"])
        assert cl["max_pixel_diff_vs_plain"] <= 2  # the same computation in another memory layout
    else:
        assert report["train"].startswith("skipped")
