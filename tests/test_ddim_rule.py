"""DDIM inversion's two noise-label rules (icd.samplers.DDIM_RULES): the reference rule is exactly diffusers'
`DDIMInverseScheduler` on the same grid, and the two rules differ."""

import pytest
import torch
from diffusers import DDIMInverseScheduler

from icd import world
from icd.models.loading import load_model
from icd.paths import embedded_model_path
from icd.samplers import ddim_invert


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


def test_the_two_rules_differ_and_start_is_the_default(teacher_batch):
    model, z0, cond = teacher_batch
    _, start = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule)
    _, explicit = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule, rule="start")
    _, reference = ddim_invert(model.eps_fn(), z0, cond, steps=10, schedule=model.schedule, rule="reference")
    assert torch.equal(start[-1], explicit[-1])
    assert (start[-1] - reference[-1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown DDIM rule"):
        ddim_invert(model.eps_fn(), z0, cond, steps=2, schedule=model.schedule, rule="end")
