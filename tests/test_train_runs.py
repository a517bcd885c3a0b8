"""Training runs that cannot change under you (issue 34): the run folder records what its weights are and a resume
that differs is refused before any model loads; a damaged latest checkpoint falls back to the last intact one;
final/ is replaced only by the run that wrote it; data problems are found before any model loads, counted and
reported; a truncated checkpoint given to `icd bench --adapters` is one line."""

import io
import json
import logging
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from icd.cli import main
from icd.models import lora
from icd.models.loading import ModelError
from icd.train import checkpoint as ckpt
from icd.train import icd as icd_train
from icd.train.config import ConfigError
from icd.train.icd import ICDConfig, export_checkpoint, train_icd
from icd.train.runner import MAY_CHANGE, RUN_FILE, check_run
from icd.train.sources import BadImage, DataError, decode_image, open_source, size_problem


def _cfg(tmp_path, model_dir, out="run", **kw):
    base = dict(out_dir=str(tmp_path / out), model=str(model_dir), steps=1, batch_size=2, n_images=4, rank=4,
                lr=1e-3, checkpoint_every=1, log_every=1, w_set=(0.0, 2.0), threads=1)
    return ICDConfig(**{**base, **kw})


def _snapshot(folder):
    """Every file under `folder` with its bytes: what "nothing changed" means."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a trainer loads its model (the refusals must come first)."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(icd_train, "load_model", refuse)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _final(folder):
    return {n: load_file(str(folder / f"{n}.safetensors")) for n in lora.ADAPTERS}


# ------------------------------------------------------------------------------------------ the run's record
@pytest.fixture(scope="module")
def finished(tmp_path_factory, random_distilled_dir):
    """A finished one-step iCD run (rank 4, boundaries 4step-1), shared read-only: tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    train_icd(_cfg(root, random_distilled_dir))
    return root / "run"


def _copy(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def test_the_run_folder_records_what_shapes_its_weights(finished):
    record = json.loads((finished / RUN_FILE).read_text())
    assert record["config_class"] == "ICDConfig"
    assert record["config"]["rank"] == 4 and record["config"]["boundaries"] == "4step-1"
    assert record["identity"]["lora_targets"] == list(lora.LORA_TARGETS)
    assert record["identity"]["family"] == "StableDiffusionPipeline"


@pytest.mark.parametrize("field, value, shown", [
    ("boundaries", "3step", "boundaries=4step-1; this config says 3step"),
    ("rank", 2, "rank=4; this config says 2"),
    ("seed", 7, "seed=0; this config says 7"),
    ("reverse_boundaries", (0, 500), "reverse_boundaries=[]; this config says [0, 500]"),
])
def test_a_resume_that_changes_the_weights_meaning_is_refused_before_the_model_loads(
        finished, tmp_path, random_distilled_dir, no_model, field, value, shown):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    kw = {field: value} | ({"forward_boundaries": (500, 999)} if field == "reverse_boundaries" else {})
    with pytest.raises(ConfigError, match=re.escape(f"holds a run with {shown}: use a new out_dir or the same value")):
        train_icd(_cfg(tmp_path, random_distilled_dir, steps=2, **kw))
    assert _snapshot(run) == before


def test_the_cli_refuses_a_changed_rank_in_one_line_and_changes_nothing(finished, tmp_path, random_distilled_dir,
                                                                       capsys):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    toml = tmp_path / "icd.toml"
    toml.write_text(f'[icd]\nout_dir = "{run}"\nmodel = "{random_distilled_dir}"\nsteps = 2\nbatch_size = 2\n'
                    'n_images = 4\nrank = 4\ncheckpoint_every = 1\nthreads = 1\nw_set = [0.0, 2.0]\n')
    for extra in (["--set", "rank=8"], ["--set", "boundaries=3step"], ["--no-resume"]):
        assert main(["train", "icd", "--config", str(toml), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("icd: error: out_dir") and "\n" not in err, err
    assert _snapshot(run) == before


def test_a_legacy_run_without_run_json_is_checked_against_its_checkpoint(finished, tmp_path, random_distilled_dir,
                                                                         no_model):
    run = _copy(finished, tmp_path)
    (run / RUN_FILE).unlink()
    with pytest.raises(ConfigError, match="rank=4; this config says 2"):
        train_icd(_cfg(tmp_path, random_distilled_dir, rank=2))


def test_another_component_into_the_same_out_dir_is_refused(finished, tmp_path):
    from icd.train.guidance import GuidanceConfig

    run = _copy(finished, tmp_path)
    with pytest.raises(ConfigError, match="a ICDConfig run; this is a GuidanceConfig"):
        check_run(GuidanceConfig(out_dir=str(run)))


def test_final_is_never_replaced_by_a_run_that_did_not_start_from_it(finished, tmp_path, random_distilled_dir,
                                                                     no_model):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"holds a finished run \(final/\); a fresh run \(--no-resume\)"):
        train_icd(_cfg(tmp_path, random_distilled_dir), resume=False)
    for step in run.glob("step-*"):  # final/ without the checkpoints it came from: a fresh run, refused
        for f in step.iterdir():
            f.unlink()
        step.rmdir()
    (run / "latest").unlink()
    with pytest.raises(ConfigError, match="holds final/ but no checkpoint to resume from"):
        train_icd(_cfg(tmp_path, random_distilled_dir, steps=2))
    assert {k: v for k, v in _snapshot(run).items() if not str(k).startswith("step-") and str(k) != "latest"} == {
        k: v for k, v in before.items() if not str(k).startswith("step-") and str(k) != "latest"}


def test_fields_that_may_change_do_and_the_resume_updates_final(finished, tmp_path, random_distilled_dir):
    assert {"steps", "lr_min", "checkpoint_every", "log_every", "threads", "device"} <= MAY_CHANGE
    assert not {"rank", "alpha", "boundaries", "model", "data", "seed", "batch_size", "lr"} & MAY_CHANGE
    run = _copy(finished, tmp_path)
    old = _final(run / "final")
    train_icd(_cfg(tmp_path, random_distilled_dir, steps=2, log_every=2, checkpoint_every=2, tau=0.5))
    assert json.loads((run / RUN_FILE).read_text())["config"]["steps"] == 2
    assert json.loads((run / "final" / "adapters.json").read_text())["tau"] == 0.5
    new = _final(run / "final")
    assert any(not torch.equal(old[n][k], new[n][k]) for n in lora.ADAPTERS for k in old[n])


def test_a_stale_record_without_weights_binds_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RUN_FILE).write_text(json.dumps({"config_class": "ICDConfig", "config": {"rank": 99}}))
    check_run(ICDConfig(out_dir=str(tmp_path / "run"), rank=4))  # a run that failed before its first checkpoint


# ---------------------------------------------------------------------------------------- damaged checkpoints
def test_checkpoint_problem_names_the_damaged_file(tmp_path):
    module, opt = torch.nn.Linear(30, 20), None
    opt = torch.optim.AdamW(module.parameters())
    module(torch.randn(2, 30)).sum().backward()
    opt.step()
    good = ckpt.save_checkpoint(tmp_path, 1, modules={"m": module}, optimizers={"m": opt})
    assert ckpt.checkpoint_problem(good) is None
    bad = ckpt.save_checkpoint(tmp_path, 2, modules={"m": module}, optimizers={"m": opt})
    _truncate(bad / "optim.m.safetensors")
    assert "optim.m.safetensors is unreadable" in ckpt.checkpoint_problem(bad)
    (bad / "optim.m.safetensors").unlink()
    assert ckpt.checkpoint_problem(bad) == "optim.m.safetensors is missing"
    (bad / "state.json").write_text("{not json")
    assert ckpt.checkpoint_problem(bad).startswith("state.json is unreadable")
    with pytest.raises(ckpt.CheckpointError, match="step-000002: state.json is unreadable"):
        ckpt.load_checkpoint(bad, modules={"m": module})


def test_a_truncated_latest_checkpoint_falls_back_to_the_intact_one_and_resumes_exactly(
        tmp_path, random_distilled_dir, caplog):
    train_icd(_cfg(tmp_path, random_distilled_dir, out="damaged", steps=2))
    _truncate(tmp_path / "damaged" / "step-000002" / "model.unet.safetensors")
    with caplog.at_level(logging.WARNING, logger="icd.train.checkpoint"):
        damaged = train_icd(_cfg(tmp_path, random_distilled_dir, out="damaged", steps=3))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-000002 is damaged (model.unet.safetensors is unreadable" in w and "step-000001" in w
               for w in warnings), warnings
    reference = train_icd(_cfg(tmp_path, random_distilled_dir, out="reference", steps=3))
    a, b = _final(damaged), _final(reference)
    assert all(torch.equal(a[n][k], b[n][k]) for n in lora.ADAPTERS for k in a[n])  # resumed from step 1: exact


def test_no_intact_checkpoint_is_one_line_before_the_model_loads(finished, tmp_path, random_distilled_dir, no_model,
                                                                 capsys):
    run = _copy(finished, tmp_path)
    for step in run.glob("step-*"):
        _truncate(step / "model.unet.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint in .*model.unet.safetensors is unreadable"):
        train_icd(_cfg(tmp_path, random_distilled_dir, steps=2))
    toml = tmp_path / "icd.toml"
    toml.write_text(f'[icd]\nout_dir = "{run}"\nmodel = "{random_distilled_dir}"\nsteps = 2\nbatch_size = 2\n'
                    'n_images = 4\nrank = 4\nlr = 1e-3\ncheckpoint_every = 1\nlog_every = 1\nthreads = 1\n'
                    'w_set = [0.0, 2.0]\n')
    assert main(["train", "icd", "--config", str(toml)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("icd: error: no intact checkpoint") and "\n" not in err, err


def test_a_truncated_checkpoint_given_as_adapters_is_a_model_error_naming_the_file(finished, tmp_path, no_model):
    run = _copy(finished, tmp_path)
    step = sorted(run.glob("step-*"))[-1]
    _truncate(step / "model.unet.safetensors")
    with pytest.raises(ModelError, match="model.unet.safetensors is unreadable"):
        export_checkpoint(step, tmp_path / "exported")
    (step / "state.json").write_text('{"step": 1')
    with pytest.raises(ModelError, match="state.json is unreadable"):
        export_checkpoint(step, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_bench_adapters_pointing_at_a_truncated_checkpoint_exit_2(finished, tmp_path, random_icd_dir, capsys):
    run = _copy(finished, tmp_path)
    step = sorted(run.glob("step-*"))[-1]
    _truncate(step / "model.unet.safetensors")
    code = main(["bench", "inversion", "--model", str(random_icd_dir), "--n", "1", "--methods", "icd:X",
                 "--adapters", f"X={step}", "--out", str(tmp_path / "bench")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("icd: error:") and "\n" not in err, err
    assert "model.unet.safetensors is unreadable" in err and "Safetensor" not in err.split(":")[1]


def test_a_truncated_adapters_file_is_a_model_error(finished, tmp_path, random_distilled_dir):
    from icd.models.loading import load_icd_model

    run = _copy(finished, tmp_path)
    _truncate(run / "final" / f"{lora.REVERSE}.safetensors")
    with pytest.raises(ModelError, match=f"{lora.REVERSE}.safetensors"):
        load_icd_model(random_distilled_dir, adapters=run / "final")


# ------------------------------------------------------------------------------------------------ data
def _photo(i, size=(40, 32)):
    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _folder(root, rows, images=None):
    """An imagefolder: `rows` are metadata.jsonl objects; `images` {name: PIL image} (default: a photo per row)."""
    root.mkdir(parents=True)
    for i, row in enumerate(rows):
        name = row.get("file_name")
        if isinstance(name, str) and name:
            (images or {}).get(name, _photo(i)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_row_without_the_image_column_names_the_file_line_and_column(tmp_path):
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}, {"text": "no image"}]
    folder = _folder(tmp_path / "f", rows)
    with pytest.raises(DataError, match=r"metadata.jsonl line 3: no 'file_name' value \(the image column; got null"):
        open_source(str(folder))
    csv_file = tmp_path / "f" / "rows.csv"
    csv_file.write_text("file_name,text\na.png,a\n,empty name\n")
    with pytest.raises(DataError, match=r"rows.csv line 3: an empty 'file_name' value"):
        open_source(str(csv_file))


def test_null_and_non_text_captions_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"file_name": f"{i}.png", "text": t} for i, t in enumerate(["a red circle", None, 42, ["x"], "a cat"])]
    rows.append({"file_name": "5.png"})
    with caplog.at_level(logging.WARNING, logger="icd.train.sources"):
        source = open_source(str(_folder(tmp_path / "f", rows)))
    assert source.captions == ["a red circle", "a cat"] and source.keys == ["0.png", "4.png"]
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "skipped 4 of 6 rows" in line and "1 caption is null" in line and "2 caption is not text" in line
    assert "1 no caption" in line and "\n" not in line
    nulls = [{"file_name": f"{i}.png", "text": None} for i in range(3)]
    with pytest.raises(DataError, match=r"no usable row \(of 3\): caption is null"):
        open_source(str(_folder(tmp_path / "g", nulls)))


def test_degenerate_sizes_are_skipped_with_a_count(tmp_path, caplog):
    assert size_problem(1, 1) and size_problem(10000, 10) and size_problem(20000, 1) and size_problem(9000, 8000)
    assert size_problem(64, 64) is None and size_problem(512, 64) is None
    sizes = {"tiny.png": (1, 1), "strip.png": (10000, 10), "line.png": (20000, 1), "ok.png": (40, 32)}
    rows = [{"file_name": n, "text": "a red circle"} for n in sizes]
    images = {n: Image.new("RGB", s) for n, s in sizes.items()}
    with caplog.at_level(logging.WARNING, logger="icd.train.sources"):
        source = open_source(str(_folder(tmp_path / "f", rows, images)))
    assert source.keys == ["ok.png"]
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "skipped 3 of 4 rows: image of a degenerate size (first: line 1: tiny.png, 1x1 px" in line
    buf = io.BytesIO()
    Image.new("RGB", (20000, 1)).save(buf, format="PNG")
    with pytest.raises(BadImage, match="20000x1 px, shorter side below 8 px"):  # any format, as it is read
        decode_image(buf.getvalue(), "line.png")


def test_no_readable_image_stops_before_the_model_loads(tmp_path, random_distilled_dir, no_model):
    rows = [{"file_name": f"{i}.png", "text": "a red circle"} for i in range(3)]
    folder = _folder(tmp_path / "f", rows)
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"no readable image in the data \(3 rows; first: 0.png: not a readable"):
        train_icd(_cfg(tmp_path, random_distilled_dir, data=str(folder), resolution=32))
    for i in range(3):  # headers that open, pixels that do not: found by decoding, still before the model
        buf = io.BytesIO()
        _photo(i).save(buf, format="PNG")
        (folder / f"{i}.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(DataError, match="no readable image in the data"):
        open_source(str(folder))
    assert not (tmp_path / "run").exists()


def test_shards_skip_null_captions_and_refuse_shards_without_a_readable_image(tmp_path):
    def shard(path, samples):
        with tarfile.open(path, "w") as tar:
            for key, image, meta in samples:
                for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    _photo(0).save(buf, format="JPEG")
    shard(tmp_path / "a.tar", [("s0", buf.getvalue(), {"text": None}), ("s1", buf.getvalue(), {"text": "a cat"})])
    source = open_source(str(tmp_path / "a.tar"))
    with pytest.raises(BadImage, match="caption is null"):
        source.read(source.shards[0], "s0")
    assert source.read(source.shards[0], "s1")[1] == "a cat"
    shard(tmp_path / "b.tar", [("s0", b"junk", {"text": "a cat"})])
    with pytest.raises(DataError, match="no readable image in the data"):
        open_source(str(tmp_path / "b.tar"))
