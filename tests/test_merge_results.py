"""benchmarks/merge_results.py --by-kind: per-kind editing runs joined into the row one run over every kind gives."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_results.py"
spec = importlib.util.spec_from_file_location("merge_results", SCRIPT)
merge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(merge)


def _row(kind: str, n: int, gt: float, nfe: int, gt_min: float) -> dict:
    quality = {"gt_psnr": gt, "judge_accuracy": 0.5, "gt_psnr_min": gt_min}
    return {"nfe": nfe, "seconds_per_image": 2.0, "seconds_spread": [1.0, 3.0], "timing_images": 3, **quality,
            "per_kind": {kind: {"n": n, **quality}}}


def test_join_kinds_weights_by_cases_and_keeps_every_kind():
    row = merge.join_kinds([_row("color", 100, 26.0, 574, 14.5), _row("shape", 300, 22.0, 550, 16.0)])
    assert row["gt_psnr"] == pytest.approx((100 * 26.0 + 300 * 22.0) / 400)
    assert row["nfe"] == 556 and isinstance(row["nfe"], int)
    assert row["gt_psnr_min"] == 14.5
    assert row["seconds_spread"] == [1.0, 3.0] and row["timing_images"] == 6
    assert set(row["per_kind"]) == {"color", "shape"}


def test_by_kind_refuses_a_kind_twice(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"task": "editing", "model": "embedded", "n": 100, "kinds": ["color"], "methods": {"m": {}}}))
    with pytest.raises(SystemExit, match="a kind is in two files"):
        merge.merge_by_kind([f"{tmp_path / 'a.json'}:m", f"{tmp_path / 'b.json'}:m"])


def test_method_names_may_hold_a_colon(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"task": "inversion", "methods": {"icd:S2": {"nfe": 4}, "icd": {"nfe": 8}}}))
    merged = merge.merge_rows([f"{path}:icd:S2,icd"])
    assert list(merged["methods"]) == ["icd:S2", "icd"]


def test_a_part_without_methods_or_file_is_one_line(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"task": "inversion", "methods": {"icd": {"nfe": 8}}}))
    for part in (str(path), f"{path}:"):
        with pytest.raises(SystemExit, match="expected FILE.json:METHOD"):
            merge.merge_rows([part])
    with pytest.raises(SystemExit, match="no such results file"):
        merge.merge_rows([f"{tmp_path / 'gone.json'}:icd"])
