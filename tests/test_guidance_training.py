import torch

from icd.models.loading import GUIDANCE_UNET as GUIDANCE_SUBFOLDER
from icd.models.loading import load_model
from icd.train.guidance import GuidanceConfig, train_guidance


def test_guidance_training_runs_and_ships_a_distilled_unet(tmp_path, random_model_dir):
    cfg = GuidanceConfig(out_dir=str(tmp_path / "g"), model=str(random_model_dir), steps=3, batch_size=2,
                         n_images=8, checkpoint_every=2, log_every=1, w_set=(0.0, 2.0))
    final = train_guidance(cfg)
    assert (final / GUIDANCE_SUBFOLDER / "config.json").is_file()
    model = load_model(final, unet_subfolder=GUIDANCE_SUBFOLDER)
    assert model.guidance_distilled and model.unet.config.time_cond_proj_dim == 512
    cond = model.encode_prompt(["a large red circle on a gray background"] * 2)
    eps = model.eps_fn(guidance=torch.tensor([0.0, 2.0]))(torch.randn(2, 4, 16, 16), 500, cond)
    assert eps.shape == (2, 4, 16, 16) and torch.isfinite(eps).all()
    assert (tmp_path / "g" / "log.csv").read_text().count("\n") == 4


def test_guidance_config_requires_w0():
    import pytest

    with pytest.raises(ValueError, match="contain 0"):
        GuidanceConfig(w_set=(1.0, 2.0))
