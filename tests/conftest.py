import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist (`make test` runs two workers) each worker takes one core; alone, the suite takes two.
torch.set_num_threads(min(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2, torch.get_num_threads()))


def run_interrupted(train, cfg, *, after: int, monkeypatch) -> None:
    """Run `train(cfg)` until it has finished `after` steps (KeyboardInterrupt there, as a kill would stop it),
    then run it again to the end: the second call resumes from the checkpoint."""
    from icd.train.runner import TrainingRun  # the fixtures' heavy imports stay out of collection

    end_step = TrainingRun.end_step

    def interrupt(run, values):
        end_step(run, values)
        if run.step == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, "end_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(TrainingRun, "end_step", end_step)
    train(cfg)


def tiny_guidance_and_icd(model_dir, root, *, subfolder: str):
    """(distilled folder, the same plus iCD adapters in icd/): two steps of `icd train guidance` on the tiny
    `model_dir`, then two steps of `icd train icd` (rank 4) on its distilled network in `subfolder`, under `root`."""
    import shutil

    from icd.train.guidance import GuidanceConfig, train_guidance  # the fixtures' heavy imports stay out of collection
    from icd.train.icd import ICDConfig, train_icd

    tiny = dict(batch_size=4, n_images=8, log_every=1, threads=1)
    distilled = train_guidance(GuidanceConfig(out_dir=str(root / "guidance"), model=str(model_dir), steps=2,
                                              checkpoint_every=2, **tiny))
    out = root / "model"
    shutil.copytree(distilled, out)
    run = train_icd(ICDConfig(out_dir=str(root / "icd"), model=str(distilled), unet_subfolder=subfolder, steps=2,
                              rank=4, checkpoint_every=2, **tiny))
    shutil.copytree(run, out / "icd")
    return distilled, out


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def icd_serve(args: list[str], log: Path, *, wait_s: float, ready: str = "/"):
    """`icd serve --port P ARGS` in its own process, its output in `log`; yields its URL once GET `ready` answers,
    fails the test if it exits or does not answer within `wait_s`, and stops it afterwards."""
    pytest.importorskip("fastapi", reason="the web extra is not installed (pip install -e '.[web]')")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "icd.cli", "serve", "--port", str(port), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"icd serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url + ready, timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.perf_counter() - t0 < wait_s, f"no answer within {wait_s} s:\n{log.read_text()}"
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ICD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set ICD_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A randomly initialised pipeline folder with the embedded architecture (no training, no download)."""
    from icd import world
    from icd.models import tiny

    return tiny.build_random_pipeline(tmp_path_factory.mktemp("random_model") / "model",
                                      vocabulary=world.vocabulary(), seed=0)


@pytest.fixture(scope="session")
def random_distilled_dir(tmp_path_factory, random_model_dir):
    """`random_model_dir` plus a guidance-conditioned UNet in unet_guidance/ (random cond_proj)."""
    import shutil

    from diffusers import UNet2DConditionModel

    from icd.distill.guidance import init_student_from_teacher

    out = tmp_path_factory.mktemp("random_distilled") / "model"
    shutil.copytree(random_model_dir, out)
    student = init_student_from_teacher(UNet2DConditionModel.from_pretrained(random_model_dir / "unet"))
    torch.manual_seed(3)
    torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.02)
    student.save_pretrained(out / "unet_guidance")
    return out


@pytest.fixture(scope="session")
def random_icd_dir(tmp_path_factory, random_distilled_dir):
    """`random_distilled_dir` plus 4-step iCD adapters in icd/ (one training step, rank 4): the shipped layout."""
    import shutil

    from icd.train.icd import ICDConfig, train_icd

    out = tmp_path_factory.mktemp("random_icd") / "model"
    shutil.copytree(random_distilled_dir, out)
    cfg = ICDConfig(out_dir=str(out.parent / "run"), model=str(out), steps=1, batch_size=2, n_images=4, rank=4,
                    checkpoint_every=1, log_every=1)
    shutil.copytree(train_icd(cfg), out / "icd")
    return out


@pytest.fixture(scope="session")
def tiny_flux_folder(tmp_path_factory):
    """A randomly initialised embedded-flow (FLUX-shaped) pipeline folder: 1 double-stream + 1 single-stream block,
    2 heads x 16, seed 0 (`icd.models.flux_embedded.build_random_pipeline`; no training, no download)."""
    from icd import world
    from icd.models import flux_embedded as fe

    return fe.build_random_pipeline(tmp_path_factory.mktemp("tiny_flux") / "pipe", vocabulary=world.vocabulary(),
                                    size=fe.FluxSize(1, 1, 2, 16, (4, 6, 6)))


@pytest.fixture(scope="session")
def tiny_flux_pipe(tiny_flux_folder):
    """`tiny_flux_folder` loaded as an `icd.pipeline.Pipeline` (shared: a test that changes it must undo that)."""
    from icd.pipeline import Pipeline

    return Pipeline.from_pretrained(tiny_flux_folder)
