import pytest
import torch

from icd import world
from icd.boundaries import Boundaries
from icd.editing.inversion import icd_decode, icd_invert
from icd.models.embedded import load_icd_model
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
    model.counter.reset()
    inv = icd_invert(model, z0, cond, prompts, b)
    z0_hat = icd_decode(model, inv.noise, cond, b, guidance=torch.tensor([0.0, 1.0, 2.0]), tau=0.8)
    assert model.counter.calls == 8 and model.counter.batch_sizes == [3] * 8
    assert inv.timesteps == [19, 259, 519, 779, 999] and z0_hat.shape == z0.shape
    again = icd_invert(model, z0, cond, prompts, b)
    assert torch.equal(again.noise, inv.noise)  # a pure function of (image, prompt, noise seed)
    other = icd_invert(model, z0, cond, prompts, b, seed=1)
    assert not torch.equal(other.noise, inv.noise)


def test_three_step_boundaries_give_six_calls(tmp_path, random_distilled_dir):
    model, b = _model_with_adapters(tmp_path, random_distilled_dir, "3step")
    cond = model.encode_prompt(["a small red star on a black background"])
    z0 = torch.randn(1, 4, 16, 16)
    model.counter.reset()
    icd_decode(model, icd_invert(model, z0, cond, ["x"], b).noise, cond, b)
    assert model.counter.calls == 6


def test_icd_generation_uses_the_reverse_adapter_in_one_call_per_segment(tmp_path, random_distilled_dir):
    from icd.sampling import generate

    model, b = _model_with_adapters(tmp_path, random_distilled_dir)
    model.counter.reset()
    images = generate(model, ["a small red star on a black background"] * 2, method="icd", guidance=1.0, tau=0.8)
    assert images.shape == (2, 3, 64, 64) and model.counter.calls == 4
    model.counter.reset()
    generate(model, ["a small red star on a black background"], method="ddim", steps=3)
    assert model.counter.calls == 3  # the base UNet (adapters off)
    with pytest.raises(ValueError, match="trained for 4 steps"):
        generate(model, ["a small red star on a black background"], method="icd", steps=3)


def test_renoised_generation_is_seeded_per_sample_and_keeps_four_calls(tmp_path, random_distilled_dir):
    from icd.sampling import generate

    model, _ = _model_with_adapters(tmp_path, random_distilled_dir)
    prompts = ["a small red star on a black background", "a large blue circle on a white background"]
    model.counter.reset()
    both = generate(model, prompts, method="icd", guidance=1.0, renoise=1.0, seed=7)
    assert model.counter.calls == 4
    alone = generate(model, prompts[1:], method="icd", guidance=1.0, renoise=1.0, seed=8, batch_size=1)
    torch.testing.assert_close(both[1:], alone)  # row i's noise, fresh draws included, comes from seed + i only
    plain = generate(model, prompts, method="icd", guidance=1.0, seed=7, renoise=0.0)
    assert not torch.allclose(both, plain)
    torch.testing.assert_close(generate(model, prompts, method="icd", guidance=1.0, seed=7), both)  # the default
    with pytest.raises(ValueError, match="renoise"):
        generate(model, prompts, method="ddim", steps=2, renoise=0.5)


def test_load_icd_model_without_adapters_is_a_clear_error(tmp_path, random_distilled_dir):
    from icd.models.embedded import ModelError

    with pytest.raises(ModelError, match="no iCD adapters"):
        load_icd_model(random_distilled_dir, adapters=tmp_path / "nothing")
