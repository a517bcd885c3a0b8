"""SDEdit (``sdedit``: the teacher's DDIM steps; ``sdedit-icd``: the iCD reverse model's jumps): the start-time math,
the invariants on the embedded model, the CLI and bench end to end, and bad input."""

import json
import math

import numpy as np
import pytest
import torch

from icd import world
from icd.bench import BenchOptions, run_bench
from icd.bench.methods import parse_methods
from icd.boundaries import Boundaries
from icd.cli import main
from icd.editing.edit import EditControls
from icd.editing.inversion import Inversion
from icd.imageio import save_image
from icd.methods.sdedit import sdedit_noised, sdedit_timesteps
from icd.metrics import psnr
from icd.pipeline import Pipeline
from icd.samplers import generation_timesteps, initial_noise
from icd.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.scaled_linear()


# ------------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("strength, nfe", [(1.0, 50), (0.5, 25), (0.34, 17), (0.1, 5), (0.02, 1), (0.001, 1)])
def test_teacher_runs_the_grid_below_t_s(strength, nfe):
    times = sdedit_timesteps(strength, generation_timesteps(50))
    assert len(times) - 1 == nfe and times == generation_timesteps(50)[-nfe - 1:]
    assert times[0] == max(19, round(strength * 1000) - 1)


def test_strength_one_is_plain_generation_and_icd_starts_at_the_nearest_boundary():
    assert sdedit_timesteps(1.0, generation_timesteps(10)) == generation_timesteps(10)
    reverse = Boundaries.preset("4step-1").reverse_schedule()  # 999 -> 779 -> 519 -> 259 -> 0
    assert {s: sdedit_timesteps(s, reverse) for s in (0.1, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0)} == {
        0.1: [259, 0], 0.3: [259, 0], 0.5: [519, 259, 0], 0.6: [519, 259, 0], 0.7: [779, 519, 259, 0],
        0.9: [999, 779, 519, 259, 0], 1.0: reverse}
    assert sdedit_timesteps(0.39, [779, 519, 259, 0]) == [259, 0]  # t_S = 389: a tie between 259 and 519 goes low


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_bad_strength_is_refused(bad):
    with pytest.raises(ValueError, match="strength"):
        sdedit_timesteps(bad, generation_timesteps(50))


def test_noising_is_the_forward_process():
    z0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    abar = SCHEDULE.abar[499].item()
    expected = math.sqrt(abar) * z0 + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(sdedit_noised(z0, eps, 499, schedule=SCHEDULE), expected)


# ------------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", 1_000_700_000)


def test_strength_one_from_pure_noise_equals_generation(pipe, case):
    """The teacher variant, started from pure seeded noise at t = T - 1, is plain DDIM generation (same seed and
    steps); SDEdit's own start there is q(x_999 | z0) with the same draw, at 0 UNet calls."""
    prompt, seed, steps = case.target_prompt, 7, 10
    model = pipe.model_for("sdedit")
    model.counter.reset()
    made = pipe.invert(case.source[None], [case.source_prompt], method="sdedit", strength=1.0, steps=steps, seed=seed)
    assert model.counter.calls == 0 and made.timesteps == [0, 999]
    noise = initial_noise(model.latent_shape(), [seed])
    torch.testing.assert_close(made.noise, sdedit_noised(made.latents[0], noise, 999, schedule=model.schedule))
    pure = Inversion(latents=[made.latents[0], noise], timesteps=[0, 999], prompts=[prompt], method="sdedit",
                     settings=dict(made.settings))
    edited = pipe.edit(pure, [prompt]).images[0].astype(int)
    generated = pipe.generate([prompt], method="ddim", steps=steps, seed=seed).uint8()[0].astype(int)
    assert np.abs(edited - generated).max() <= 1


def test_small_strength_leaves_the_source_almost_unchanged(pipe, case):
    src = case.source[None]
    same = pipe.edit(pipe.invert(src, [case.source_prompt], method="sdedit", strength=0.02), [case.source_prompt])
    assert psnr(src, same.images)[0] > 29.0  # one DDIM step from t = 19: the VAE's round trip, ~31 dB
    small, large = (pipe.edit(pipe.invert(src, [case.source_prompt], method="sdedit-icd", strength=s),
                              [case.target_prompt]).images for s in (0.1, 0.9))
    assert psnr(src, small)[0] > psnr(src, large)[0] + 3.0


@pytest.mark.parametrize("method, steps, strength, nfe", [
    ("sdedit", 50, 0.1, 5), ("sdedit", 10, 0.3, 3), ("sdedit", 10, 0.75, 7), ("sdedit-icd", None, 0.3, 1),
    ("sdedit-icd", None, 0.5, 2), ("sdedit-icd", None, 0.8, 3)])
def test_counted_nfe(pipe, case, method, steps, strength, nfe):
    model = pipe.model_for(method)
    model.counter.reset()
    inv = pipe.invert(case.source[None], [case.source_prompt], method=method, steps=steps, strength=strength)
    result = pipe.edit(inv, [case.target_prompt])
    assert model.counter.calls == result.nfe == nfe


def test_sdedit_refuses_attention_control_and_other_methods_refuse_strength(pipe, case, tmp_path):
    inv = pipe.invert(case.source[None], [case.source_prompt], method="sdedit-icd", strength=0.5)
    with pytest.raises(ValueError, match="no attention control"):
        pipe.edit(inv, [case.target_prompt], EditControls())
    with pytest.raises(ValueError, match="strength"):
        pipe.invert(case.source[None], [case.source_prompt], method="icd", strength=0.5)
    inv.save(tmp_path / "inv")  # a saved record decodes identically; a tampered one is refused
    a, b = (pipe.edit(x, [case.target_prompt]).images for x in (inv, Inversion.load(tmp_path / "inv")))
    np.testing.assert_array_equal(a, b)
    inv.timesteps = [0, 779]
    with pytest.raises(ValueError, match="starts at 519"):
        pipe.edit(inv, [case.target_prompt])


# ------------------------------------------------------------------------------------------------ CLI and bench


def _edit(tmp_path, case, *extra):
    save_image(case.source, tmp_path / "src.png")
    return ["edit", str(tmp_path / "src.png"), "--source", case.source_prompt, "--target", case.target_prompt,
            "-o", str(tmp_path / "out.png"), "--force", *extra]


def test_cli_reports_method_and_counted_nfe(tmp_path, case, capsys):
    for method, strength, steps, nfe in (("sdedit", "0.2", "20", 4), ("sdedit-icd", "0.8", "4", 3)):
        assert main(_edit(tmp_path, case, "--method", method, "--strength", strength, "--steps", steps, "--json")) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["method"] == method and report["nfe"] == report["nfe_edit"] == nfe
        assert report["nfe_invert"] == 0 and report["strength"] == float(strength) and report["control"] == "none"
        assert (tmp_path / "out.png").is_file()


@pytest.mark.parametrize("extra, needle", [
    (["--method", "sdedit", "--strength", "0"], "(0, 1]"), (["--method", "sdedit", "--strength", "1.5"], "(0, 1]"),
    (["--method", "sdedit", "--strength", "nan"], "(0, 1]"), (["--method", "sdedit", "--masactrl"], "--masactrl"),
    (["--method", "sdedit-icd", "--blend", "red"], "--blend"), (["--method", "icd", "--strength", "0.5"], "sdedit")])
def test_cli_bad_input_is_one_line(tmp_path, case, capsys, extra, needle):
    out = tmp_path / "out.png"
    assert main(_edit(tmp_path, case, *extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icd: error:") and needle in lines[0], lines
    assert not out.exists()


def test_bench_counts_nfe_and_names_strengths(tmp_path):
    assert [m.name for m in parse_methods("sdedit50@0.6,sdedit-icd@0.5,sdedit", allowed=("sdedit", "sdedit-icd"))
            ] == ["sdedit50@0.6", "sdedit-icd@0.5", "sdedit50"]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_methods("sdedit50@1.5", allowed=("sdedit",))
    opts = BenchOptions(task="editing", out=str(tmp_path / "b"), n=1, kinds="color",
                        methods="sdedit50@0.1,sdedit-icd@0.3", batch=1, n_timing=1, progress=False)
    methods = run_bench(opts)["methods"]
    assert {k: (m["nfe"], m["nfe_invert"]) for k, m in methods.items()} == {"sdedit50@0.1": (5, 0),
                                                                            "sdedit-icd@0.3": (1, 0)}
    assert all("gt_psnr" in m and "judge_accuracy" in m for m in methods.values())
