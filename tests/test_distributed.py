"""`icd train icd` with two CPU processes (torchrun, gloo) matches a single-process run on the same global batch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icd.models import lora
from icd.train.icd import ICDConfig, train_icd

TOML = """[icd]
out_dir = "{out}"
model = "{model}"
steps = 2
batch_size = 4
n_images = 8
rank = 4
lr = 1e-3
checkpoint_every = 1
log_every = 1
"""


def _two_processes(cfg_path: Path) -> str:
    """`icd train icd --config cfg_path` in two torchrun CPU processes (gloo); their stderr."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file() or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    # --standalone: torchrun picks a free rendezvous port, so back-to-back runs never collide on 29500
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "icd.cli", "train", "icd", "--config",
           str(cfg_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": str(torchrun.parent), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr


def _equals_one_process(multi: Path, single: Path, model: Path, **extra) -> None:
    """A one-process run of TOML's config (plus `extra` fields) into `single` trains the adapters `multi` holds."""
    # The reference runs one thread, as each torchrun rank does (OMP_NUM_THREADS=1): with the load-following
    # default thread count its float summation order changed with whatever else ran on the machine, and the mean
    # difference went from ~1e-7 to 6e-6 beside a busy process.
    threads = torch.get_num_threads()
    try:
        train_icd(ICDConfig(out_dir=str(single), model=str(model), steps=2, batch_size=4, n_images=8, rank=4, lr=1e-3,
                            checkpoint_every=1, log_every=1, threads=1, **extra))
    finally:
        torch.set_num_threads(threads)
    # Equal up to float summation order; Adam's first steps (update ~ lr * sign(grad)) can amplify that noise on
    # near-zero gradients, so a few elements may differ by up to 2 lr, but the average difference must be tiny.
    # Each process sees half of the global batch, so only the averaged gradients make the two runs agree.
    for name in lora.ADAPTERS:
        a = load_file(str(multi / "final" / f"{name}.safetensors"))
        b = load_file(str(single / "final" / f"{name}.safetensors"))
        diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        print(f"{name}: max {float(diffs.max()):.3g} mean {float(diffs.mean()):.3g}")
        assert diffs.max() <= 2e-3 and diffs.mean() < 1e-6, (float(diffs.max()), float(diffs.mean()))


def test_two_processes_match_one(tmp_path, random_distilled_dir):
    cfg_path = tmp_path / "icd.toml"
    cfg_path.write_text(TOML.format(out=tmp_path / "multi", model=random_distilled_dir))
    _two_processes(cfg_path)
    _equals_one_process(tmp_path / "multi", tmp_path / "single", random_distilled_dir)
    shutil.rmtree(tmp_path / "multi", ignore_errors=True)


def test_two_sharded_processes_match_one(tmp_path, random_distilled_dir):
    """fsdp = true: the frozen UNet sharded over two processes (FSDP2 on gloo, `icd.runtime.shard_frozen`), the LoRA
    adapters whole: the same adapters as one process, after a stop at step 1 and a resume (exact resume), every
    process validating, a LoRA-only checkpoint."""
    cfg_path = tmp_path / "icd.toml"
    text = TOML.format(out=tmp_path / "multi", model=random_distilled_dir) + "fsdp = true\nn_validation = 2\n"
    cfg_path.write_text(text.replace("steps = 2", "steps = 1"))
    stderr = _two_processes(cfg_path)  # stops after step 1 (a checkpoint and final/)
    assert "fsdp: the frozen network sharded over 2 processes" in stderr, stderr[-2000:]
    cfg_path.write_text(text + "validate_every = 2\n")
    stderr = _two_processes(cfg_path)  # the same run to step 2, resumed from step 1
    assert "resumed from" in stderr and "(step 1)" in stderr, stderr[-2000:]
    _equals_one_process(tmp_path / "multi", tmp_path / "single", random_distilled_dir)
    saved = load_file(str(tmp_path / "multi" / "step-000002" / "model.unet.safetensors"))
    assert saved and all(".lora_" in k for k in saved)  # the adapters alone, whole
    rows = (tmp_path / "multi" / "validation.csv").read_text().strip().splitlines()
    assert len(rows) == 2, rows  # header + one row: written once, by the main process


def test_two_sharded_processes_match_one_on_a_flux_transformer(tmp_path, tiny_flux_folder):
    """The same on FLUX's layout (double- and single-stream blocks are the units; the distilled transformer)."""
    from icd.models import flux
    from icd.train.guidance import GuidanceConfig, train_guidance

    distilled = train_guidance(GuidanceConfig(out_dir=str(tmp_path / "G"), model=str(tiny_flux_folder), steps=1,
                                              batch_size=2, n_images=4, checkpoint_every=1, log_every=1, threads=1))
    cfg_path = tmp_path / "icd.toml"
    cfg_path.write_text(TOML.format(out=tmp_path / "multi", model=distilled)
                        + f"fsdp = true\nunet_subfolder = \"{flux.GUIDANCE_SUBFOLDER}\"\n")
    stderr = _two_processes(cfg_path)
    assert "fsdp: the frozen network sharded over 2 processes in 3 units" in stderr, stderr[-2000:]  # 1 + 1 blocks
    _equals_one_process(tmp_path / "multi", tmp_path / "single", distilled, unet_subfolder=flux.GUIDANCE_SUBFOLDER)


def test_two_processes_match_one_on_real_data(tmp_path):
    """The guidance stage on an image folder with a tiny SD1.5-shaped pipeline: the data stream splits each global
    batch by rows, so two processes train on exactly the rows one process does."""
    from icd.models.loading import GUIDANCE_UNET as GUIDANCE_SUBFOLDER
    from icd.models.synthetic import write_pipeline
    from icd.train.guidance import GuidanceConfig, train_guidance
    from test_real_data_training import VOCAB, _image_folder

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file() or not torch.distributed.is_available():
        pytest.skip("torchrun / torch.distributed not available")
    pipe = write_pipeline(tmp_path / "pipe", "sd15", vocabulary=VOCAB).pipeline
    folder = _image_folder(tmp_path / "data", 8)
    fields = dict(model=str(pipe), data=str(folder), resolution=32, steps=2, batch_size=4, w_set=[0.0, 2.0],
                  lr=1e-4, checkpoint_every=1, log_every=1, n_validation=1, threads=1)
    cfg_path = tmp_path / "g.toml"
    cfg_path.write_text("[guidance]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                                 {**fields, "out_dir": str(tmp_path / "multi")}.items()))
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "icd.cli", "train", "guidance", "--config",
           str(cfg_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "PATH": str(torchrun.parent), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "global batch 4 = 2 per micro-batch x 1 accumulation x 2 process(es)" in res.stderr
    train_guidance(GuidanceConfig(**{**fields, "w_set": (0.0, 2.0), "out_dir": str(tmp_path / "single")}))
    weights = "diffusion_pytorch_model.safetensors"
    a = load_file(str(tmp_path / "multi" / "final" / GUIDANCE_SUBFOLDER / weights))
    b = load_file(str(tmp_path / "single" / "final" / GUIDANCE_SUBFOLDER / weights))
    start = load_file(str(pipe / "unet" / weights))  # the student starts as the teacher (cond_proj at zero)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    moved = torch.cat([(b[k] - start[k]).abs().flatten() for k in b if k in start])
    # as above: equal up to summation order, which Adam's sign-like first steps amplify on a few elements
    report = (float(diffs.max()), float(diffs.mean()), float(moved.mean()))
    assert diffs.max() <= 2 * 2 * 1e-4 and diffs.mean() < 0.01 * moved.mean(), report
