"""`icd bench`: method parsing, aggregation and schema, end-to-end runs on the embedded model (deterministic
re-runs, counted NFE), the PIE-Bench path on a world fixture, 2-process sharding and CLI errors."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icd import world
from icd.bench import BenchOptions, run_bench
from icd.bench.cases import world_cases
from icd.bench.methods import parse_methods
from icd.bench.results import quality_view, summarize, validate
from icd.cli import main as cli_main

# ------------------------------------------------------------------------------------------------ units


def test_parse_methods_expands_families_and_rejects_bad_names():
    names = [m.name for m in parse_methods("icd,ddim,nti4", steps_list=[1, 4])]
    assert names == ["icd", "ddim1", "ddim4", "nti4"]
    assert [m.name for m in parse_methods("ddim,gddim")] == ["ddim50", "gddim50"]
    assert parse_methods("icd:G3", adapters={"G3": "x"})[0].adapters == "G3"
    for bad, msg in [("dim50", "unknown method"), ("icd:G3", "--adapters G3=DIR"), ("ddim4,ddim4", "twice"),
                     ("ddim0", ">= 1"), ("", "no method")]:
        with pytest.raises(ValueError, match=msg):
            parse_methods(bad)
    with pytest.raises(ValueError, match="not measured"):
        parse_methods("npi", allowed=("icd", "ddim"))


def test_world_cases_skip_scenes_without_an_edit_of_the_kind():
    with pytest.raises(world.NoEditError):
        world.make_case("size", 271)  # a small and a large cross of one colour: no size edit keeps them distinct
    cases = world_cases(["size"], 3, seed_start=270)
    assert [c.case_id for c in cases] == ["size-270", "size-272", "size-273"]
    assert all(c.source_prompt != c.target_prompt for c in cases)


def test_summarize_means_per_kind_and_validate_rejects_missing_or_nan():
    records = [{"method": "m", "index": i, "case_id": str(i), "kind": k, "psnr": v}
               for i, (k, v) in enumerate([("a", 10.0), ("a", 20.0), ("b", 40.0)])]
    s = summarize(records, ["a", "b"])
    assert s["psnr"] == pytest.approx(70 / 3) and s["per_kind"]["a"] == {"n": 2, "psnr": 15.0, "psnr_min": 10.0}
    assert s["psnr_min"] == 10.0  # the worst case beside the mean
    results = {"schema_version": 1, "task": "inversion", "device": "cpu", "torch": "x", "n": 3, "seed_start": 0,
               "methods": {"m": {"nfe": 8, "seconds_per_image": 0.1, "seconds_invert": 0.05, "seconds_decode": 0.05,
                                 "ssim": 0.9, "ms_ssim": 0.9, **s}}}
    validate(results)
    results["methods"]["m"]["psnr"] = math.nan
    with pytest.raises(ValueError, match="psnr"):
        validate(results)
    del results["methods"]["m"]["ssim"]
    with pytest.raises(ValueError, match="missing ssim"):
        validate(results)


# ------------------------------------------------------------------------------------------------ end to end


def _edit_opts(out, **kw) -> BenchOptions:
    base = dict(task="editing", out=str(out), n=1, kinds="color,size", methods="icd,ddim2", batch=2, n_timing=1,
                examples=1, progress=False)
    return BenchOptions(**{**base, **kw})


def test_editing_bench_counts_nfe_writes_the_schema_and_reruns_identically(tmp_path):
    a = run_bench(_edit_opts(tmp_path / "a"))
    b = run_bench(_edit_opts(tmp_path / "b"))
    assert quality_view(a) == quality_view(b)  # deterministic inversion and editing
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    validate(saved, "editing")
    for key in ("device", "torch", "n", "seed_start", "methods"):
        assert key in saved
    icd, ddim = saved["methods"]["icd"], saved["methods"]["ddim2"]
    assert (icd["nfe"], icd["nfe_invert"], icd["nfe_edit"]) == (8, 4, 4)  # counted, not assumed
    assert (ddim["nfe"], ddim["nfe_invert"], ddim["nfe_edit"]) == (4, 2, 2)
    for m in (icd, ddim):
        assert set(m["per_kind"]) == {"color", "size"}
        for key in ("gt_psnr", "gt_ssim", "bg_psnr", "bg_ssim", "psnr", "ssim", "judge_accuracy", "seconds_invert",
                    "seconds_edit", "seconds_per_image"):
            assert math.isfinite(m[key]), key
    assert icd["seconds_bare"] > 0
    skipped = {s["metric"]: s["reason"] for s in saved["skipped_metrics"]}
    assert {"lpips", "clip_t", "clip_i", "dino"} <= set(skipped) and all(skipped.values())
    for name in ("results.md", "quality-vs-nfe.png", "seconds.png", "per-kind.png", "examples.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert "| **icd** | 8 |" in (tmp_path / "a" / "results.md").read_text()


def test_inversion_and_generation_benches(tmp_path):
    inv = run_bench(BenchOptions(task="inversion", out=str(tmp_path / "inv"), n=2, methods="icd,ddim,gddim2",
                                 steps_list="1,3", batch=2, n_timing=1, progress=False))
    assert list(inv["methods"]) == ["icd", "ddim1", "ddim3", "gddim2"]
    assert [inv["methods"][m]["nfe"] for m in inv["methods"]] == [8, 2, 6, 4]
    assert inv["methods"]["icd"]["psnr"] > inv["methods"]["ddim1"]["psnr"]  # iCD reconstructs; DDIM 1+1 does not
    gen = run_bench(BenchOptions(task="generation", out=str(tmp_path / "gen"), n=1, methods="icd,gddim3", batch=2,
                                 n_timing=1, progress=False))
    assert set(gen["methods"]["icd"]["per_kind"]) == {"1-object", "2-objects"}
    assert gen["methods"]["icd"]["nfe"] == 4 and gen["methods"]["gddim3"]["nfe"] == 3
    assert 0.0 <= gen["methods"]["icd"]["judge_accuracy"] <= 1.0
    assert gen["renoise"] == 1.0 and "renoise = 1.0" in (tmp_path / "gen" / "results.md").read_text()  # the default
    paper = run_bench(BenchOptions(task="generation", out=str(tmp_path / "gen-r0"), n=1, methods="icd", batch=2,
                                   n_timing=1, renoise=0.0, progress=False))
    assert paper["renoise"] == 0.0 and paper["methods"]["icd"]["nfe"] == 4
    with pytest.raises(ValueError, match="generation benchmark only"):
        BenchOptions(task="inversion", out=str(tmp_path / "x"), renoise=1.0)


def test_vae_method_and_guidance_bench(tmp_path):
    """`vae`: encode + decode only (0 UNet calls), the reconstruction ceiling; `icd bench guidance`: the distilled
    UNet's one call against two-pass CFG, exactly 0 apart from the student's own error at w = 0."""
    inv = run_bench(BenchOptions(task="inversion", out=str(tmp_path / "inv"), n=3, methods="vae,icd", batch=3,
                                 n_timing=1, progress=False))
    vae, icd = inv["methods"]["vae"], inv["methods"]["icd"]
    assert vae["nfe"] == 0 and vae["psnr"] >= icd["psnr"] and vae["psnr_min"] <= vae["psnr"]
    g = run_bench(BenchOptions(task="guidance", out=str(tmp_path / "g"), n=4, batch=3, n_timing=1, guidance=2.0,
                               progress=False))
    m = g["methods"]["gddim"]
    assert m["nfe"] == 1 and 0 < m["mse_student_vs_cfg"] < m["mse_unguided_vs_cfg"] + m["mse_cfg_vs_true_noise"]
    again = run_bench(BenchOptions(task="guidance", out=str(tmp_path / "g1"), n=4, batch=4, n_timing=1, guidance=2.0,
                                   progress=False))  # the draws do not depend on the batching
    assert again["methods"]["gddim"]["mse_student_vs_cfg"] == pytest.approx(m["mse_student_vs_cfg"], rel=1e-5)
    w0 = run_bench(BenchOptions(task="guidance", out=str(tmp_path / "g0"), n=2, n_timing=1, guidance=0.0,
                                progress=False))
    assert w0["methods"]["gddim"]["mse_unguided_vs_cfg"] == 0.0
    with pytest.raises(ValueError, match="no step count"):
        run_bench(BenchOptions(task="guidance", out=str(tmp_path / "g2"), methods="gddim50"))


def test_pie_bench_folder_runs_through_the_editing_bench(tmp_path):
    from icd.bench.piebench import write_fixture

    root = write_fixture(tmp_path / "pie", n_per_kind=1)
    r = run_bench(BenchOptions(task="editing", out=str(tmp_path / "out"), n=1, methods="icd", pie_bench=str(root),
                               kinds="change_color,change_content", batch=2, n_timing=1, progress=False))
    m = r["methods"]["icd"]
    assert r["cases"].startswith("pie-bench:") and set(m["per_kind"]) == {"change_color", "change_content"}
    assert "bg_psnr" in m and "gt_psnr" not in m  # PIE-Bench has masks but no target images
    assert "judge_accuracy" in m  # the fixture's prompts are world captions


def test_two_processes_gather_the_single_process_results(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file() or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    args = ["bench", "editing", "--cases", "2", "--kinds", "color,size", "--methods", "icd", "--batch", "1",
            "--n-timing", "2", "--examples", "0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "icd.cli", *args, "--out",
                          str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "icd.cli", *args, "--threads", "1", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert (two["processes"], one["processes"]) == (2, 1)
    assert quality_view(two) == quality_view(one)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("argv, message", [
    (["--methods", "foo"], "unknown method"),
    (["--n", "0"], "--n must be >= 1"),
    (["--kinds", "texture"], "unknown edit kind"),
    (["--pie-bench", "/nonexistent/pie"], "PIE-Bench folder not found"),
])
def test_cli_bad_options_give_one_line_errors(tmp_path, capsys, argv, message):
    code = cli_main(["bench", "editing", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("icd: error:") and message in err and "\n" not in err


def test_cli_keeps_existing_results_without_force(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "results.json").write_text("{}")
    assert cli_main(["bench", "inversion", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "results.json").read_text() == "{}"


def test_example_images_are_uint8_world_edits(tmp_path):
    r = run_bench(_edit_opts(tmp_path / "e", methods="icd", kinds="color"))
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "e" / "examples.png"))
    assert grid.dtype == np.uint8 and grid.shape[0] > 64
    assert r["methods"]["icd"]["per_kind"]["color"]["n"] == 1


def test_lpips_weights_on_disk_add_the_metric_instead_of_a_skip(tmp_path):
    from safetensors.torch import save_file

    from icd.bench.lpips import ALEXNET_CONVS, LPIPS_CHANNELS

    g = torch.Generator().manual_seed(0)
    weights = {}
    for i, (out, inp, k, _, _) in ALEXNET_CONVS.items():
        weights[f"features.{i}.weight"] = torch.randn(out, inp, k, k, generator=g) * (2.0 / (inp * k * k)) ** 0.5
        weights[f"features.{i}.bias"] = torch.zeros(out)
    for i, c in enumerate(LPIPS_CHANNELS):
        weights[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g) / c
    save_file(weights, str(tmp_path / "lpips.safetensors"))
    r = run_bench(_edit_opts(tmp_path / "o", methods="icd", kinds="color", lpips=str(tmp_path / "lpips.safetensors")))
    m = r["methods"]["icd"]
    assert m["lpips"] > 0 and m["bg_lpips"] >= 0
    assert "lpips" not in {s["metric"] for s in r["skipped_metrics"]}
