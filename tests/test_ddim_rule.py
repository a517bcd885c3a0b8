"""DDIM inversion's two noise-label rules (icd.samplers.DDIM_RULES): the reference rule (the default) is exactly
diffusers' `DDIMInverseScheduler` on the same grid, step by step and as a whole reconstruction, and the two rules
differ. The DDIM methods take the model's scheduler-config end points (`NoiseSchedule.configured`), as diffusers'
schedulers built from that config do."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler

from icd import world
from icd.metrics import psnr
from icd.models.loading import load_model
from icd.paths import embedded_model_path
from icd.pipeline import Pipeline
from icd.samplers import ddim_invert

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ddim_rule.py"


@pytest.fixture(scope="module")
def teacher_batch():
    model = load_model("embedded")
    scenes = [world.sample_scene(900 + i, max_objects=2) for i in range(2)]
    images = torch.stack([torch.as_tensor(world.render(s)) for s in scenes]).numpy()
    return model, model.encode_images(images), model.encode_prompt([s.caption for s in scenes])


def test_reference_rule_is_diffusers_ddim_inverse_scheduler(teacher_batch):
    """Same grid (19, 39, ..., 999: "trailing" spacing; time 0 is clean data: set_alpha_to_one), same teacher: the
    latents agree to float rounding at every step."""
    model, z0, cond = teacher_batch
    timesteps, ours = ddim_invert(model.eps_fn(), z0, cond, steps=50, schedule=model.schedule, rule="reference")
    scheduler = DDIMInverseScheduler.from_pretrained(embedded_model_path() / "scheduler", timestep_spacing="trailing",
                                                     set_alpha_to_one=True)
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == timesteps[1:]
    x = z0
    eps = model.eps_fn()
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps.tolist()):
            x = scheduler.step(eps(x, t, cond), t, x).prev_sample
            assert torch.allclose(x, ours[k + 1], rtol=1e-4, atol=1e-4), f"step {k} (t = {t})"


def test_the_configured_schedule_is_diffusers_schedulers_with_the_models_end_points(teacher_batch):
    """The embedded model's config has set_alpha_to_one False: inversion's first jump starts from abar_0 and decoding's
    last lands on it, step by step as diffusers' DDIMInverseScheduler and DDIMScheduler built from the config (on the
    trailing grid, which the DDIM methods keep); iCD's view keeps a clean time 0."""
    from diffusers import DDIMScheduler

    from icd.samplers import ddim_loop, generation_timesteps

    model, z0, cond = teacher_batch
    sched = model.schedule.configured()
    assert not sched.set_alpha_to_one and sched.grid(10) == model.schedule.grid(10)
    assert float(sched.alpha_sigma(0)[0]) ** 2 == pytest.approx(0.99915, abs=1e-5)
    assert float(model.schedule.alpha_sigma(0)[0]) == 1.0  # iCD's math: time 0 is clean data
    timesteps, ours = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=sched)
    inverse = DDIMInverseScheduler.from_pretrained(embedded_model_path() / "scheduler", timestep_spacing="trailing")
    inverse.set_timesteps(10)
    assert timesteps == [0, *inverse.timesteps.tolist()]
    eps = model.eps_fn()
    x = z0
    with torch.no_grad():
        for k, t in enumerate(inverse.timesteps.tolist()):
            x = inverse.step(eps(x, t, cond), t, x).prev_sample
            torch.testing.assert_close(x, ours[k + 1], rtol=1e-4, atol=1e-4, msg=f"inversion step {k} (t = {t})")
        forward = DDIMScheduler.from_pretrained(embedded_model_path() / "scheduler", timestep_spacing="trailing")
        forward.set_timesteps(10)
        assert generation_timesteps(10, sched) == [*forward.timesteps.tolist(), 0]
        y = x
        for t in forward.timesteps.tolist():
            y = forward.step(eps(y, t, cond), t, y).prev_sample
        decoded = ddim_loop(eps, x, cond, generation_timesteps(10, sched), schedule=sched).final
    torch.testing.assert_close(decoded, y, rtol=1e-4, atol=1e-4)
    _, hard = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule)
    assert (hard[-1] - ours[-1]).abs().max() > 1e-4  # the end points matter


def test_the_two_rules_differ_and_reference_is_the_default(teacher_batch):
    model, z0, cond = teacher_batch
    _, default = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule)
    _, start = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule, rule="start")
    _, reference = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule, rule="reference")
    assert torch.equal(default[-1], reference[-1])
    assert (start[-1] - reference[-1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown DDIM rule"):
        ddim_invert(model.eps_fn(), z0, cond, steps=2, schedule=model.schedule, rule="end")


def test_ddim_50_reconstruction_equals_diffusers_alone():
    """The bar's check on two held-out images: `--method ddim --steps 50` (inversion + reconstruction, default rule)
    against a loop of diffusers' own pipeline and schedulers built from the model's scheduler config on the trailing
    grid, with no icd code (benchmarks/ddim_rule.py's ``endpoint`` way): <= 0.05 dB apart."""
    spec = importlib.util.spec_from_file_location("ddim_rule", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    scenes = [world.sample_scene(1_000_000_000 + i, max_objects=2) for i in range(2)]
    images = np.stack([world.render(s) for s in scenes])
    prompts = [s.caption for s in scenes]
    ours = Pipeline.from_pretrained("embedded").reconstruct(images, prompts, method="ddim", steps=50)
    theirs = bench.diffusers_reconstruct(bench.load_diffusers(embedded_model_path()), images, prompts, steps=50,
                                         schedule=bench.SCHEDULES["endpoint"])
    gap = np.abs(psnr(images, ours.images) - psnr(images, theirs))
    assert gap.max() <= 0.05, gap
    assert np.abs(ours.images.astype(int) - theirs.astype(int)).max() <= 2
