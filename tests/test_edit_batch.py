"""`icd edit --batch EDITS.jsonl` on the embedded model (issue 36 §8): three world edits with one model load; each
line's output equals the same `icd edit`; a bad line stops the batch before any compute with its line number; an
edit failing mid-run is reported and the others are written (exit 1)."""

import json

import numpy as np
import pytest
from PIL import Image

from icd import world
from icd.cli import main

KINDS = ("color", "shape", "size")


@pytest.fixture
def batch(tmp_path):
    """Three world cases under tmp_path/cases and edits.jsonl naming them (paths relative to its folder)."""
    lines = []
    for i, kind in enumerate(KINDS):
        case = world.make_case(kind, world.EVAL_SEED_START + i)
        (tmp_path / "cases").mkdir(exist_ok=True)
        Image.fromarray(case.source).save(tmp_path / "cases" / f"{kind}.png")
        controls = {"blend": list(case.blend_words)} if kind == "color" else {"seed": 3, "cross_replace": 0.4}
        lines.append({"image": f"cases/{kind}.png", "source": case.source_prompt, "target": case.target_prompt,
                      "output": f"out/{kind}.png", "controls": controls})
    (tmp_path / "out").mkdir()
    return tmp_path, lines


def _write(tmp_path, lines) -> str:
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return str(path)


def _run(argv, capsys):
    code = main(argv + ["--threads", "1"])
    out, err = capsys.readouterr()
    return code, out, err


def test_batch_edits_each_line_as_a_single_edit_with_one_load(batch, capsys, monkeypatch):
    import icd.cli.common

    tmp_path, lines = batch
    loads = []
    real = icd.cli.common.load_pipeline
    monkeypatch.setattr(icd.cli.edit, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    code, out, err = _run(["edit", "--batch", _write(tmp_path, lines), "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert loads == [1] and summary["edits"] == summary["done"] == 3 and summary["failed"] == []
    assert [r["line"] for r in summary["results"]] == [1, 2, 3] and all(r["nfe"] == 8 for r in summary["results"])
    assert summary["seconds"] >= summary["seconds_load"] + summary["seconds_edits"] * 0.99
    line = lines[1]  # the same edit alone: the same pixels
    code, _, err = _run(["edit", str(tmp_path / line["image"]), "--source", line["source"], "--target",
                         line["target"], "--seed", "3", "--cross-replace", "0.4", "-o", str(tmp_path / "one.png")],
                        capsys)
    assert code == 0, err
    for name, other in (("shape", "one.png"),):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{name}.png")),
                              np.asarray(Image.open(tmp_path / other)))
    code, out, err = _run(["edit", "--batch", _write(tmp_path, lines)], capsys)  # outputs exist, no --force
    assert code == 2 and err.startswith("icd: error:") and "line 1: output exists" in err


@pytest.mark.parametrize("bad, message", [
    ("{not json", ": not JSON"),
    ({"image": "cases/color.png", "source": "a", "target": "b"}, ": output missing"),
    ({"controls": {"method": "ddim"}}, ": controls: unknown key 'method'"),
    ({"controls": {"cross_replace": 2.0}}, "cross"),
    ({"controls": {"seed": -1}}, "--seed"),
    ({"controls": {"swap": "yes"}}, ": controls: swap must be true or false"),
    ({"output": "out/color.png"}, "color.png is also line 1's output"),
    ({"image": "missing.png"}, ": image not found"),
    ({"output": "out/x.txt"}, ": unsupported output extension"),
])
def test_a_bad_line_stops_the_batch_before_the_model_loads(batch, capsys, monkeypatch, bad, message):
    import icd.cli.edit

    tmp_path, lines = batch
    monkeypatch.setattr(icd.cli.edit, "load_pipeline", lambda *a, **k: pytest.fail("the model loaded"))
    if isinstance(bad, dict) and "source" not in bad:
        bad = {**lines[1], **bad}
    code, _, err = _run(["edit", "--batch", _write(tmp_path, [lines[0], bad, lines[2]])], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("icd: error: "), err
    assert "edits.jsonl line 2" in err and message in err
    assert not list((tmp_path / "out").iterdir())


def test_batch_options_and_model_checks_come_before_any_edit(batch, capsys):
    tmp_path, lines = batch
    path = _write(tmp_path, lines)
    code, _, err = _run(["edit", "--batch", path, "--grid", "g.png"], capsys)
    assert code == 2 and "drop --grid" in err
    code, _, err = _run(["edit", "--batch", str(tmp_path / "none.jsonl")], capsys)
    assert code == 2 and "none.jsonl: not found" in err
    unknown = {**lines[2], "target": lines[2]["target"] + " zebra"}  # a word the world model cannot read
    code, _, err = _run(["edit", "--batch", _write(tmp_path, [lines[0], unknown])], capsys)
    assert code == 2 and "edits.jsonl line 2: " in err and "zebra" in err
    code, _, err = _run(["edit", "--batch", _write(tmp_path, [lines[0], {**lines[1], "controls": {"guidance": 1e9}}])],
                        capsys)
    assert code == 2 and "edits.jsonl line 2: " in err and "guidance" in err
    assert not list((tmp_path / "out").iterdir())


def test_an_edit_failing_mid_run_is_reported_and_the_rest_written(batch, capsys, monkeypatch):
    import icd.cli.edit
    from icd.solver import NumericsError

    tmp_path, lines = batch
    real = icd.cli.edit.edit_one

    def second_fails(editor, args, image):
        if args.output.endswith("shape.png"):
            raise NumericsError("NaN/Inf in the latents at step 2")
        return real(editor, args, image)

    monkeypatch.setattr(icd.cli.edit, "edit_one", second_fails)
    code, out, err = _run(["edit", "--batch", _write(tmp_path, lines), "--json"], capsys)
    assert code == 1
    assert err.strip().splitlines() == ["icd: error: " + str(tmp_path / "edits.jsonl") + " line 2: NaN/Inf in the "
                                        "latents at step 2", "icd: error: 1 of 3 edits failed (line 2)"]
    summary = json.loads(out)
    assert summary["done"] == 2 and [f["line"] for f in summary["failed"]] == [2]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["color.png", "size.png"]
