import pytest
import torch

from icd import world
from icd.boundaries import Boundaries
from icd.models import lora
from icd.models.loading import load_icd_model
from icd.pipeline import Pipeline
from icd.samplers import icd_decode, icd_invert, initial_noise
from icd.train.icd import ICDConfig, train_icd


def _model_with_adapters(tmp_path, model_dir, boundaries="4step-1"):
    cfg = ICDConfig(out_dir=str(tmp_path / f"icd-{boundaries}"), model=str(model_dir), steps=1, batch_size=2,
                    n_images=4, rank=4, boundaries=boundaries, checkpoint_every=1, log_every=1)
    model = load_icd_model(model_dir, adapters=train_icd(cfg))
    assert model.icd.boundaries == Boundaries.preset(boundaries) and model.icd.tau == cfg.tau
    return model, model.icd.boundaries


def test_icd_round_trip_counts_calls_and_is_deterministic(tmp_path, random_distilled_dir):
    model, b = _model_with_adapters(tmp_path, random_distilled_dir)
    scenes = [world.sample_scene(world.EVAL_SEED_START + i) for i in range(3)]
    images = torch.stack([torch.from_numpy(world.render(s)) for s in scenes]).numpy()
    prompts = [s.caption for s in scenes]
    cond = model.encode_prompt(prompts)
    z0 = model.encode_images(images)
    forward = model.eps_fn(adapter=lora.FORWARD)
    reverse = model.eps_fn(adapter=lora.REVERSE, guidance=torch.tensor([0.0, 1.0, 2.0]), tau=0.8)
    noise = initial_noise(z0.shape[1:], [0] * 3)
    model.counter.reset()
    timesteps, latents = icd_invert(forward, z0, cond, b, schedule=model.schedule, noise=noise)
    z0_hat = icd_decode(reverse, latents[-1], cond, b, schedule=model.schedule)
    assert model.counter.calls == 8 and model.counter.batch_sizes == [3] * 8
    assert timesteps == [19, 259, 519, 779, 999] and z0_hat.shape == z0.shape
    pipe = Pipeline(model)
    inv = pipe.invert(images, prompts)
    torch.testing.assert_close(inv.noise, latents[-1])  # the pipeline runs the same sampler
    assert torch.equal(pipe.invert(images, prompts).noise, inv.noise)  # a pure function of (image, prompt, seed)
    assert not torch.equal(pipe.invert(images, prompts, seed=1).noise, inv.noise)


def test_three_step_boundaries_give_six_calls(tmp_path, random_distilled_dir):
    model, b = _model_with_adapters(tmp_path, random_distilled_dir, "3step")
    cond = model.encode_prompt(["a small red star on a black background"])
    z0 = torch.randn(1, 4, 16, 16)
    model.counter.reset()
    _, latents = icd_invert(model.eps_fn(adapter=lora.FORWARD), z0, cond, b, schedule=model.schedule,
                            noise=torch.randn_like(z0))
    icd_decode(model.eps_fn(adapter=lora.REVERSE), latents[-1], cond, b, schedule=model.schedule)
    assert model.counter.calls == 6


def test_icd_generation_uses_the_reverse_adapter_in_one_call_per_segment(tmp_path, random_distilled_dir):
    model, b = _model_with_adapters(tmp_path, random_distilled_dir)
    pipe = Pipeline(model)
    model.counter.reset()
    images = pipe.generate(["a small red star on a black background"] * 2, method="icd", guidance=1.0, tau=0.8).images
    assert images.shape == (2, 3, 64, 64) and model.counter.calls == 4
    model.counter.reset()
    pipe.generate(["a small red star on a black background"], method="gddim", steps=3)
    assert model.counter.calls == 3  # the guidance-distilled UNet with its adapters off
    with pytest.raises(ValueError, match="take 4 steps"):
        pipe.generate(["a small red star on a black background"], method="icd", steps=3)


def test_renoised_generation_is_seeded_per_sample_and_keeps_four_calls(tmp_path, random_distilled_dir):
    model, _ = _model_with_adapters(tmp_path, random_distilled_dir)
    def generate(*args, **kwargs):
        return Pipeline(model).generate(*args, **kwargs).images

    prompts = ["a small red star on a black background", "a large blue circle on a white background"]
    model.counter.reset()
    both = generate(prompts, method="icd", guidance=1.0, renoise=1.0, seed=7)
    assert model.counter.calls == 4
    alone = generate(prompts[1:], method="icd", guidance=1.0, renoise=1.0, seed=8, batch_size=1)
    torch.testing.assert_close(both[1:], alone)  # row i's noise, fresh draws included, comes from seed + i only
    plain = generate(prompts, method="icd", guidance=1.0, seed=7, renoise=0.0)
    assert not torch.allclose(both, plain)
    torch.testing.assert_close(generate(prompts, method="icd", guidance=1.0, seed=7), both)  # the default
    with pytest.raises(ValueError, match="renoise"):
        generate(prompts, method="gddim", steps=2, renoise=0.5)


def test_load_icd_model_without_adapters_is_a_clear_error(tmp_path, random_distilled_dir):
    from icd.models.loading import ModelError

    with pytest.raises(ModelError, match="no iCD adapters"):
        load_icd_model(random_distilled_dir, adapters=tmp_path / "nothing")


def test_settings_resolve_defaults_in_one_place_and_refuse_what_no_run_can_use():
    pipe = Pipeline.from_pretrained()
    assert pipe.settings("icd", "edit") == pipe.settings("icd", "edit", guidance=1.0, tau=0.8, steps=4)
    gen = pipe.settings("icd", "generate")
    assert (gen.tau, gen.renoise, gen.steps) == (None, 1.0, 4)  # constant guidance, re-noised jumps
    assert pipe.settings("ddim", "invert").steps == 50 and pipe.settings("ddim", "invert").guidance == 0.0
    for kw, flag in [(dict(steps=0), "--steps"), (dict(steps=-3), "--steps"), (dict(steps=1001), "--steps"),
                     (dict(guidance=float("nan")), "--guidance"), (dict(guidance=1e9), "--guidance"),
                     (dict(guidance=-1.0), "--guidance"), (dict(tau=1.5), "--tau"), (dict(renoise=2.0), "--renoise")]:
        with pytest.raises(ValueError, match=flag):
            pipe.settings("ddim" if "steps" in kw else "icd", "generate", **kw)
    with pytest.raises(ValueError, match="choose from icd, ddim, npi, nti"):
        pipe.settings("gddim", "edit")  # the registry lists the valid names for the task
