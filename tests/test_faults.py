"""Fault injection (issue: reliability): killed training resumes to identical weights; failed checkpoint writes
leave the previous checkpoint intact and stop with a clear error."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from icd.cli import main
from icd.models import lora
from icd.train import checkpoint as ckpt
from icd.train.icd import ICDConfig, train_icd

STEPS = 6


def _toml(tmp_path, model_dir, out):
    path = tmp_path / f"{out}.toml"
    path.write_text(f'[icd]\nout_dir = "{tmp_path / out}"\nmodel = "{model_dir}"\nsteps = {STEPS}\nbatch_size = 2\n'
                    f'n_images = 8\nrank = 4\nlr = 1e-3\ncheckpoint_every = 1\nlog_every = 1\nthreads = 1\n')
    return path


def _adapters(folder):
    return {n: load_file(str(folder / f"{n}.safetensors")) for n in lora.ADAPTERS}


def test_sigkill_at_a_random_step_then_resume_gives_identical_weights(tmp_path, random_distilled_dir):
    kill_at = random.Random(os.getpid()).randint(1, STEPS - 2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cfg_file = _toml(tmp_path, random_distilled_dir, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "icd.cli", "train", "icd", "--config", str(cfg_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "killed" / f"step-{kill_at:06d}"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"
    assert not (tmp_path / "killed" / "final").exists()
    assert main(["train", "icd", "--config", str(cfg_file)]) == 0  # resumes from the newest intact checkpoint
    reference = train_icd(ICDConfig(out_dir=str(tmp_path / "reference"), model=str(random_distilled_dir),
                                    steps=STEPS, batch_size=2, n_images=8, rank=4, lr=1e-3, checkpoint_every=1,
                                    log_every=1, threads=1))  # the killed run's thread count: identical bits
    a, b = _adapters(tmp_path / "killed" / "final"), _adapters(reference)
    for name in lora.ADAPTERS:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), f"killed at step {kill_at}"


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    module = torch.nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, 1, modules={"m": module})
    real = ckpt.save_file

    def full_disk(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device; .*step-000001 is intact"):
        ckpt.save_checkpoint(tmp_path, 2, modules={"m": module})
    assert ckpt.latest_checkpoint(tmp_path).name == "step-000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]  # no partial folder left
    monkeypatch.setattr(ckpt, "save_file", real)
    ckpt.load_checkpoint(tmp_path / "step-000001", modules={"m": torch.nn.Linear(3, 2)})


def test_training_stops_with_one_line_error_when_the_disk_fills(tmp_path, random_distilled_dir, monkeypatch,
                                                                 capsys):
    real = ckpt.save_file

    def fail_at_step_3(tensors, path, *a, **k):
        if "step-000003" in str(path):
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", fail_at_step_3)
    code = main(["train", "icd", "--config", str(_toml(tmp_path, random_distilled_dir, "full"))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("icd: error: cannot write checkpoint")
    assert "step-000002 is intact" in err[-1]
    assert ckpt.latest_checkpoint(tmp_path / "full").name == "step-000002"


def test_model_folders_with_pickles_or_wrong_weights_are_refused(tmp_path, random_model_dir):
    import shutil

    from icd.models.loading import ModelError, load_model

    pickled = tmp_path / "pickled"
    shutil.copytree(random_model_dir, pickled)
    unet = pickled / "unet"
    weights = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(weights, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="cannot load the model"):
        load_model(pickled)
    broken = tmp_path / "broken"
    shutil.copytree(random_model_dir, broken)
    cfg = broken / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace('"cross_attention_dim": 64', '"cross_attention_dim": 32'))
    with pytest.raises(ModelError, match=r"unet: its config.json and its weights disagree \(the config makes "):
        load_model(broken)


def test_adapters_for_another_architecture_are_refused(tmp_path, random_icd_dir):
    import json
    import shutil

    from icd.models.loading import ModelError, load_icd_model

    bad = tmp_path / "adapters"
    shutil.copytree(random_icd_dir / "icd", bad)
    meta = json.loads((bad / "adapters.json").read_text())
    meta["rank"] = 8  # the files hold rank-4 matrices
    (bad / "adapters.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="cannot load iCD adapters"):
        load_icd_model(random_icd_dir, adapters=bad)


def test_adapters_with_missing_keys_are_refused(tmp_path, random_icd_dir):
    import shutil

    from safetensors.torch import save_file

    from icd.models.loading import ModelError, load_icd_model

    bad = tmp_path / "adapters"
    shutil.copytree(random_icd_dir / "icd", bad)
    state = load_file(str(bad / f"{lora.REVERSE}.safetensors"))
    save_file(dict(list(state.items())[: len(state) // 2]), str(bad / f"{lora.REVERSE}.safetensors"))
    with pytest.raises(ModelError, match="lacks"):
        load_icd_model(random_icd_dir, adapters=bad)


@pytest.mark.parametrize("damage, needle", [
    ("truncate-reverse", "cannot read"), ("no-files-key", '"files" must name'), ("not-json", "not JSON"),
    ("not-utf8", "not UTF-8"), ("json-list", "expected a JSON object"), ("rank-word", '"rank" must be'),
    ("reverse-missing", "rev_cd.safetensors is not found"), ("reverse-fifo", "not a regular file")])
def test_truncated_or_malformed_adapter_files_name_the_file(tmp_path, random_icd_dir, damage, needle):
    """Issue 25 §4: a damaged adapters folder is one ModelError line naming the file and what is wrong."""
    import json
    import shutil

    from icd.models.loading import ModelError, load_icd_model

    bad = tmp_path / "adapters"
    shutil.copytree(random_icd_dir / "icd", bad)
    meta_file, reverse = bad / "adapters.json", bad / f"{lora.REVERSE}.safetensors"
    meta = json.loads(meta_file.read_text())
    if damage == "truncate-reverse":
        reverse.write_bytes(reverse.read_bytes()[: reverse.stat().st_size // 2])
    elif damage == "no-files-key":
        meta_file.write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    elif damage == "not-json":
        meta_file.write_text("{'rank': 4,")
    elif damage == "not-utf8":
        meta_file.write_bytes(b"\xff\xfe{}")
    elif damage == "json-list":
        meta_file.write_text("[]")
    elif damage == "rank-word":
        meta_file.write_text(json.dumps({**meta, "rank": "four"}))
    elif damage == "reverse-missing":
        reverse.unlink()
    else:
        reverse.unlink()
        os.mkfifo(reverse)  # refused before it is opened: reading it would block
    with pytest.raises(ModelError) as info:
        load_icd_model(random_icd_dir, adapters=bad)
    message = str(info.value)
    assert "\n" not in message and needle in message and str(bad) in message, message


def _saved_inversion(tmp_path):
    from icd.editing.inversion import Inversion

    inv = Inversion(latents=[torch.randn(1, 4, 8, 8) for _ in range(3)], timesteps=[19, 500, 999],
                    prompts=["a red star"], method="icd", settings={"model": "x"})
    inv.save(tmp_path / "inv")
    return tmp_path / "inv.json", tmp_path / "inv.safetensors"


@pytest.mark.parametrize("damage, needle", [
    ("truncate-tensors", "cannot read"), ("not-json", "not JSON"), ("not-utf8", "not UTF-8"),
    ("other-format", "not an icd inversion"), ("no-timesteps", "lacks timesteps"),
    ("prompts-not-strings", "malformed prompts"), ("fewer-timesteps", "names 2 timesteps"),
    ("tensors-missing", "not found"), ("tensors-fifo", "not a regular file"), ("json-loop", "symbolic link loop")])
def test_truncated_or_malformed_inversions_name_the_file(tmp_path, damage, needle):
    """Issue 25 §4: a damaged saved inversion is one InversionError line naming the file and what is wrong; a
    FIFO or a symbolic-link loop is refused before anything is opened (no hang)."""
    import json

    from icd.editing.inversion import Inversion, InversionError

    meta_file, tensors = _saved_inversion(tmp_path)
    meta = json.loads(meta_file.read_text())
    assert Inversion.load(meta_file).timesteps == [19, 500, 999]  # the undamaged files load
    edits = {"not-json": "{", "other-format": json.dumps({**meta, "format": "x"}),
             "no-timesteps": json.dumps({k: v for k, v in meta.items() if k != "timesteps"}),
             "prompts-not-strings": json.dumps({**meta, "prompts": [1]}),
             "fewer-timesteps": json.dumps({**meta, "timesteps": [19, 999]})}
    if damage in edits:
        meta_file.write_text(edits[damage])
    elif damage == "not-utf8":
        meta_file.write_bytes(b"\xff{}")
    elif damage == "truncate-tensors":
        tensors.write_bytes(tensors.read_bytes()[:100])
    elif damage == "tensors-missing":
        tensors.unlink()
    elif damage == "tensors-fifo":
        tensors.unlink()
        os.mkfifo(tensors)
    else:
        meta_file.unlink()
        os.symlink(tmp_path / "inv2.json", meta_file)
        os.symlink(meta_file, tmp_path / "inv2.json")
    with pytest.raises(InversionError) as info:
        Inversion.load(meta_file)
    message = str(info.value)
    assert "\n" not in message and needle in message and str(tmp_path / "inv") in message, message


def test_training_checks_out_dir_first_and_a_failed_start_leaves_no_run_folder(tmp_path, capsys):
    """Issue 25 §3: out_dir is checked before any training; the data cache lives inside the run folder; a start
    that fails before the first checkpoint removes the folders it created."""
    from icd.train.runner import run_folder

    cfg = tmp_path / "vae.toml"
    fields = 'steps = 1\nbatch_size = 2\nn_images = 4\nn_scale_images = 4\nthreads = 1\n'
    (tmp_path / "afile").write_text("x")
    for out_dir, needle in [(tmp_path / "afile" / "run", "is not a folder"), ("/sys/icd-run", "cannot write")]:
        cfg.write_text(f'[vae]\nout_dir = "{out_dir}"\n{fields}')
        assert main(["train", "vae", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("icd: error: out_dir") and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "vae.toml"]  # nothing created, no cache beside
    cfg.write_text(f'[vae]\nout_dir = "{tmp_path / "runs" / "ok"}"\n{fields}')
    assert main(["train", "vae", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert (tmp_path / "runs" / "ok" / "cache").is_dir() and sorted(p.name for p in (tmp_path / "runs").iterdir()) \
        == ["ok"]  # the cache is inside the run folder, never beside it
    with pytest.raises(RuntimeError, match="disk on fire"):  # a failure after the run folder was made
        with run_folder(tmp_path / "new" / "run") as out:
            (out / "cache").mkdir(parents=True)
            raise RuntimeError("disk on fire")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError):  # a folder that existed before is kept
        with run_folder(tmp_path / "runs" / "ok"):
            raise RuntimeError("later failure")
    assert (tmp_path / "runs" / "ok" / "final").is_dir()
