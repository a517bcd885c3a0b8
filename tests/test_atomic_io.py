"""`icd.io.atomic_directory`: a folder is replaced whole or not at all, and the ship scripts update through it."""

import importlib.util
from pathlib import Path

import pytest

from icd.io import atomic_directory, disk_mb

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_from_current_updates_a_copy_and_swaps_it_in(tmp_path):
    final = tmp_path / "model"
    (final / "a").mkdir(parents=True)
    (final / "a" / "x.txt").write_text("old")
    (final / "keep.txt").write_text("kept")
    with atomic_directory(final, from_current=True) as tmp:
        assert _tree(tmp) == _tree(final)  # starts as a copy
        (tmp / "a" / "x.txt").write_text("new")
        assert (final / "a" / "x.txt").read_text() == "old"  # untouched until the block ends
    assert _tree(final) == {"a/x.txt": "new", "keep.txt": "kept"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp / .old left


def test_an_error_in_the_block_leaves_the_folder_as_it_was(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "x.txt").write_text("old")
    with pytest.raises(SystemExit), atomic_directory(final, from_current=True) as tmp:
        (tmp / "x.txt").write_text("half-written")
        raise SystemExit("over the limit")
    assert _tree(final) == {"x.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_without_from_current_the_folder_starts_empty(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "x.txt").write_text("old")
    with atomic_directory(final) as tmp:
        assert not any(tmp.iterdir())
        (tmp / "y.txt").write_text("new")
    assert _tree(final) == {"y.txt": "new"}


def test_disk_mb_counts_files_and_folders(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"\0" * 2**19)
    assert disk_mb(tmp_path / "d" / "f") == 0.5
    assert disk_mb(tmp_path / "d") == 0.5
    assert disk_mb(tmp_path / "missing") == 0


def test_ship_embedded_flow_over_its_limit_changes_nothing(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ship_embedded_flow", ROOT / "scripts" / "ship_embedded_flow.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    dst = tmp_path / "embedded-flow"
    dst.mkdir()
    (dst / "model_index.json").write_text("{}")
    monkeypatch.setattr(ship, "LIMIT_MB", 0)
    with pytest.raises(SystemExit, match="exceeds 0 MB; nothing changed"):
        ship.ship({}, dst)
    assert _tree(dst) == {"model_index.json": "{}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedded-flow"]
