"""`benchmarks/train_throughput.py` end to end on the CPU at tiny sizes (a GPU runs it at full size): both stages
give a row with its seconds per iteration, images / s and the projected GPU-hours of the paper's recipe."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def test_both_stages_report_throughput_and_projection(tmp_path):
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "t.json"
    threads = torch.get_num_threads()
    report = module.main(["--device", "cpu", "--scale", "20", "--image-size", "32", "--batch", "1", "--iterations",
                          "1", "--warmup", "0", "--precision", "no", "--checkpointing", "on", "--threads", "1",
                          "--out", str(out)])
    torch.set_num_threads(threads)
    assert report == json.loads(out.read_text()) and report["family"] == "sd15"
    assert [r["stage"] for r in report["rows"]] == ["guidance", "icd"]
    for row in report["rows"]:
        assert "error" not in row and row["gradient_checkpointing"] is True
        assert row["images_per_s"] == pytest.approx(1 / row["step_s"], abs=1e-3)  # rounded to 3 decimals
        p = row["projection"]
        assert p["gpu_hours"] == pytest.approx(6000 * 512 * row["step_s"] / 3600, rel=1e-2)
        assert p["wall_hours"] == pytest.approx(p["gpu_hours"] / 8, rel=1e-2)
