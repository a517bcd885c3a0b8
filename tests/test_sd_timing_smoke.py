"""`benchmarks/sd_shaped_timing.py` end to end on the CPU at tiny sizes (the GPU runs it at full size): every editing
row of both families is there with its counted UNet calls, and the ratios are the rows' seconds divided."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sd_shaped_timing.py"
STEPS = 2  # the baselines' steps (NTI: 2 steps x up to 10 inner steps)


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo  # the compiled rows' graphs: none left over from another test, none left behind

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
    for (method, variant, batch), r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        if variant.startswith("paired"):  # eager / compiled in alternation: checked below
            continue
        assert r["total_s"] > 0 and r["per_image_s"] == pytest.approx(r["total_s"] / batch)
        assert r["device"].startswith("cpu") and r["peak_gib"] > 0  # on a CPU: the process's peak resident set
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
        methods = [r["method"] for r in report["edit"]]  # icd rows (every variant) before the baselines
        assert methods.index("ddim") > max(i for i, m in enumerate(methods) if m == "icd")
    else:
        assert report["train"].startswith("skipped")


def test_cpu_user_mode_times_icd_its_floor_and_ddim_once_with_peak_memory(tmp_path):
    """The CPU-only user's wait (`--cpu-user`), at 64x64 and 1/20 width here: the lead runs it at 512x512."""
    report = _timing().main(["--cpu-user", "--scale", "20", "--image-size", "64", "--repeats", "1", "--warmups", "0",
                             "--steps", str(STEPS), "--out", str(tmp_path / "u.json")])
    assert report["cpu_user"] and report["family"] == "sd15" and report["threads"] >= 1
    assert [(r["method"], r["batch"]) for r in report["edit"]] == [("icd", 1), ("floor", 1), ("ddim", 1)]
    for r in report["edit"]:
        assert r["peak_gib"] > 0 and r["runs"] == 1 and r.get("aten_ops") is None, r  # no op-counting run
    assert report["edit"][0]["floor_ratio"]["median"] > 0 and report["edit"][2]["nfe_edit"] == STEPS


@pytest.mark.slow  # 43 s; the compiled path itself (no break, no recompile, within 2/255) is tests/test_compiled.py's
def test_compiled_rows_compile_nothing_while_timed(tmp_path, fresh_dynamo):
    """The compiled rows of the timing script (the library's path; dynamo alone here, ``--compile-backend eager``:
    seconds of tracing per graph, not inductor's minutes) with their floor and the paired eager / compiled runs;
    ``--compile-baselines`` runs in ``bash benchmarks/gpu_session.sh timing --smoke``."""
    report = _timing().main(["--device", "cpu", "--family", "sd15", "--scale", "20", "--image-size", "64",
                             "--repeats", "1", "--warmups", "0", "--skip", "train,b8,ddim,npi,nti", "--compile",
                             "default", "--compile-backend", "eager", "--compile-warmups", "1", "--compile-pairs", "2",
                             "--out", str(tmp_path / "c.json")])
    rows = {(r["method"], r["variant"]): r for r in report["edit"]}
    assert set(rows) == {("icd", "plain"), ("floor", "plain"), ("icd", "compile:default"),
                         ("floor", "compile:default"), ("icd", "paired eager / compile:default")}
    for (_, variant), r in rows.items():
        assert "error" not in r and "skipped" not in r, r
        if variant == "compile:default":
            assert r["graphs_compiled_while_timed"] == 0 and r["graph_breaks_while_timed"] == 0, r
            assert r.get("aten_ops") is None  # no operator count under a dispatch mode on a compiled row
    icd = rows["icd", "compile:default"]
    assert icd["graphs_compiled_in_warmup"] > 0 and icd["graph_breaks_in_warmup"] == 0
    assert icd["max_pixel_diff_vs_plain"] <= 2 and icd["floor_ratio"]["median"] > 0
    paired = rows["icd", "paired eager / compile:default"]
    assert paired["pairs"] == 2 and paired["graphs_compiled_while_timed"] == 0 and paired["compiled_s"] > 0
