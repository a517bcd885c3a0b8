"""`benchmarks/flow_timing.py` on the CPU at tiny scale (the GPU runs it at the real FLUX.1-dev / SD3.5-medium
architectures): every row of both families is there with finite seconds, the counted network calls each method
should make, the rows per call (two-pass CFG on SD3) and the ratios to flow-ode; the full-size configs are the
published ones."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flow_timing.py"
EXPECTED = {"flow-ode": (28, 28), "icd": (4, 4), "flowedit": (0, 24), "rf-inversion": (28, 28)}


@pytest.fixture(scope="module")
def timing():
    spec = importlib.util.spec_from_file_location("flow_timing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads wait on each other (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_full_size_configs_are_the_published_architectures(timing):
    flux, sd3 = timing.scaled("flux", 1, 1024), timing.scaled("sd3", 1, 1024)
    assert flux["transformer"] == timing.FLUX_DEV_TRANSFORMER and sd3["transformer"] == timing.SD35_MEDIUM_TRANSFORMER
    t = flux["transformer"]
    assert (t["num_layers"], t["num_single_layers"], t["num_attention_heads"], t["attention_head_dim"]) == (19, 38, 24,
                                                                                                            128)
    assert t["guidance_embeds"] and (t["in_channels"], t["joint_attention_dim"], t["pooled_projection_dim"]) == (
        64, 4096, 768)
    t = sd3["transformer"]
    assert (t["num_layers"], t["num_attention_heads"], t["attention_head_dim"], t["qk_norm"]) == (24, 24, 64,
                                                                                                  "rms_norm")
    assert t["dual_attention_layers"] == tuple(range(13)) and t["pos_embed_max_size"] == 384
    assert (t["patch_size"], t["in_channels"], t["joint_attention_dim"], t["pooled_projection_dim"],
            t["caption_projection_dim"]) == (2, 16, 4096, 2048, 1536)
    for cfg in (flux, sd3):
        assert cfg["vae"]["latent_channels"] == 16 and cfg["vae"]["block_out_channels"] == (128, 256, 512, 512)
        assert cfg["text"]["clip_length"] == 77 and cfg["text"]["t5_width"] == 4096
    assert (flux["text"]["t5_length"], sd3["text"]["t5_length"]) == (512, 256)
    assert sum(sd3["text"]["pooled"]) == 2048 and flux["text"]["pooled"] == (768,)
    with torch.device("meta"):  # parameter counts without allocating: FLUX.1-dev 11.9 B, SD3.5-medium 2.24 B
        n_flux = sum(p.numel() for p in timing.FluxTransformer2DModel(**flux["transformer"]).parameters())
        n_sd3 = sum(p.numel() for p in timing.SD3Transformer2DModel(**sd3["transformer"]).parameters())
    assert 11.8e9 < n_flux < 12.0e9 and 2.2e9 < n_sd3 < 2.3e9


def test_cpu_smoke_has_every_row_with_its_calls_and_ratios(timing, tmp_path, one_thread):
    out = tmp_path / "flow.json"
    report = timing.main(["--device", "cpu", "--scale", "24", "--image-size", "64", "--repeats", "1", "--warmups",
                          "0", "--out", str(out)])
    assert report == json.loads(out.read_text()) and report["running"] is None
    assert list(report["families"]) == ["flux", "sd3"] and report["dtype"] == "float32"  # bf16 asked: CPU upcasts
    for family, entry in report["families"].items():
        assert "error" not in entry, entry.get("error")
        assert entry["transformer_config"]["num_attention_heads"] == 1 and entry["adapters"]["mode"] == "fused"
        assert entry["guidance_embedded"] == (family == "flux")
        rows = {r["method"]: r for r in entry["rows"]}
        assert list(rows) == list(EXPECTED)
        for method, r in rows.items():
            assert "error" not in r and "skipped" not in r, r
            assert r["runs"] == 1 and math.isfinite(r["total_s"]) and r["total_s"] > 0 and r["peak_gib"] > 0
            assert r["total_s"] == pytest.approx(r["invert_s"] + r["edit_s"])
            assert (r["nfe_invert"], r["nfe_edit"]) == EXPECTED[method] and r["nfe"] == r["nfe_expected"]
            assert r["ratio_to_flow_ode"]["total_s"] == pytest.approx(r["total_s"] / rows["flow-ode"]["total_s"])
            assert r["ratio_to_flow_ode"]["nfe"] == pytest.approx(r["nfe"] / 56)
            assert r["control"] == "swap" and ("proxy" in r) == (family == "sd3" and method == "icd")
        # rows per call: the guided edits batch [source, target]; SD3's two-pass CFG doubles them, FLUX embeds it
        guided = 4 if family == "sd3" else 2
        assert rows["flow-ode"]["rows_per_call"] == {"1": 28, str(guided): 28}
        assert rows["flowedit"]["rows_per_call"] == {str(guided): 24}
        assert rows["icd"]["rows_per_call"] == {"1": 4, "2": 4}  # one call per step (SD3: the proxy's guidance 0)
        if family == "sd3":
            assert rows["icd"]["edit_settings"]["guidance"] == 0.0


def test_max_minutes_zero_writes_a_report_of_skipped_families(timing, tmp_path):
    out = tmp_path / "none.json"
    report = timing.main(["--device", "cpu", "--family", "sd3", "--image-size", "64", "--max-minutes", "0",
                          "--out", str(out)])
    assert report["families"]["sd3"]["skipped"] and report["families"]["sd3"]["rows"] == []
