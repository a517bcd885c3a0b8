"""`benchmarks/step_ablation.py` on two tiny `icd bench` runs: one row per method sorted by NFE, both tasks' columns,
a method measured by one task only has its other cells empty, and the plot is written; the steps.json record it
writes gives back the same table, under a run's newer rows."""

import importlib.util
import json
from pathlib import Path

import pytest

from icd.bench import BenchOptions, run_bench

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ablation.py"


def test_step_table_and_plot(tmp_path):
    run_bench(BenchOptions(task="inversion", n=2, methods="icd,ddim1,ddim2", out=str(tmp_path / "inv"), n_timing=1,
                           progress=False))
    run_bench(BenchOptions(task="editing", n=1, kinds="color", methods="icd,ddim2", out=str(tmp_path / "edit"),
                           n_timing=1, examples=0, progress=False))
    spec = importlib.util.spec_from_file_location("step_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.main(["--inversion", str(tmp_path / "inv"), "--editing", str(tmp_path / "edit"),
                        "--out", str(tmp_path / "steps")])
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert [r[0].strip("| ") for r in rows] == ["DDIM 1+1", "DDIM 2+2", "iCD 4+4 (shipped)"]
    assert [int(r[1]) for r in rows] == [2, 4, 8]
    assert "inversion PSNR dB" in text and "editing judge %" in text
    assert rows[0][-1].strip(" |") == "–" and rows[1][-1].strip(" |") != "–"  # ddim1: inversion only
    assert (tmp_path / "steps" / "steps.png").stat().st_size > 1000
    assert (tmp_path / "steps" / "steps.md").read_text() == text

    record = tmp_path / "steps" / "steps.json"
    rows = json.loads(record.read_text())
    assert set(rows["inversion"]) == {"icd", "ddim1", "ddim2"} and set(rows["editing"]) == {"icd", "ddim2"}
    assert rows["editing"]["icd"]["source"] == str(tmp_path / "edit" / "results.json")
    again = module.main(["--record", str(record), "--out", str(tmp_path / "again")])
    assert again == text  # the record alone: the same table
    rows["inversion"]["ddim1"]["psnr"] = 99.0  # a stale row: the run given replaces it
    record.write_text(json.dumps(rows))
    assert module.main(["--record", str(record), "--inversion", str(tmp_path / "inv"),
                        "--out", str(tmp_path / "again")]) == text
    with pytest.raises(SystemExit, match="not a steps.json record"):
        module.main(["--record", str(tmp_path / "steps" / "steps.md"), "--out", str(tmp_path / "bad")])
