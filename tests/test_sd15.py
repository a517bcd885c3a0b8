"""SD-1.5-shaped models (random weights, no download): the published architecture, and the editing and training
paths on SD's topology (four levels, attention at three of them, 77 text positions) at a reduced width."""

import numpy as np
import pytest
import torch

from icd import world
from icd.editing.edit import EditControls
from icd.models import lora, sd15
from icd.models.base import Cond
from icd.pipeline import Pipeline
from icd.runtime import Precision, ProcessGroup
from icd.train.icd import ICDConfig
from icd.train.icd_step import Batch, adapter_optimizers, batch_draws, training_step

VOCAB = world.vocabulary()


def test_configs_are_sd15():
    unet = sd15.unet_config(time_cond_proj_dim=sd15.GUIDANCE_DIM)
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert unet["layers_per_block"] == 2 and unet["cross_attention_dim"] == 768 and unet["sample_size"] == 64
    assert unet["down_block_types"][:3] == ["CrossAttnDownBlock2D"] * 3 and unet["time_cond_proj_dim"] == 512
    vae = sd15.vae_config()
    assert vae["block_out_channels"] == [128, 256, 512, 512] and vae["scaling_factor"] == 0.18215
    assert sd15.text_encoder_config(100, 0, 1)["num_hidden_layers"] == 12


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return sd15.random_models(tmp_path_factory.mktemp("sd15") / "tok", vocabulary=VOCAB, scale=10, image_size=64)


@pytest.fixture(scope="module")
def scene():
    s = world.sample_scene(3, max_objects=1)
    return world.render(s)[None], s.caption


def test_small_model_keeps_the_topology(small):
    base, icd = small
    assert [type(b).__name__ for b in base.unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert icd.guidance_distilled and not base.guidance_distilled
    assert icd.icd.boundaries.num_segments == 4 and icd.counter is base.counter
    assert icd.encode_prompt(["a red circle on a gray background"]).tokens.shape[1] == sd15.MAX_LENGTH


@pytest.mark.parametrize("method", ["icd", "ddim"])
def test_identity_edit_on_sd_topology(small, scene, method):
    """Target prompt = source prompt: the target row is the source row (P2P on every attention level), up to one
    grey level: the random-weight SD-shaped UNet amplifies float rounding between batch rows (the trained embedded
    model gives bit-identical rows, tests/test_editing.py)."""
    image, caption = scene
    editor = Pipeline(small[1], small[0])
    inv = editor.invert(image, [caption], method=method, steps=None if method == "icd" else 4)
    out = editor.edit(inv, [caption], EditControls(guidance=0.0))
    assert out.nfe == 4 and out.images.shape == (1, 64, 64, 3)
    diff = np.abs(out.images.astype(int) - out.reconstructions.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_null_text_inversion_in_fp16_stays_finite(tmp_path, scene):
    """fp16 models: the null embedding is optimised in fp32 (Adam on fp16 parameters gave NaN at the first step)."""
    base, icd = sd15.random_models(tmp_path / "tok", vocabulary=VOCAB, scale=10, image_size=64,
                                   dtype=torch.float16, rank=None)
    image, caption = scene
    editor = Pipeline(None, base)
    inv = editor.invert(image, [caption], method="nti", steps=2)
    assert all(e.dtype == torch.float16 and torch.isfinite(e).all() for e in inv.null_embeddings)
    out = editor.edit(inv, [caption.replace("circle", "square")])
    assert out.images.shape == (1, 64, 64, 3)


def test_training_step_on_sd_topology(tmp_path):
    """One iCD step (all four losses) moves both adapters and gives finite losses (fp32: bf16 autocast is slow on
    CPUs; it is tested on the embedded model in tests/test_icd_training.py)."""
    _, model = sd15.random_models(tmp_path / "tok", vocabulary=VOCAB, scale=10, image_size=64, rank=None)
    lora.add_adapters(model.unet, rank=4, alpha=4)
    cfg = ICDConfig(batch_size=2, rank=4, alpha=4, device="cpu", lr=1e-3)
    boundaries = cfg.resolved_boundaries()
    params, opts = adapter_optimizers(model, cfg)
    before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
    z0 = torch.randn(2, 4, 8, 8)
    cond = Cond(tokens=torch.randn(2, sd15.MAX_LENGTH, model.unet.config.cross_attention_dim))
    d = batch_draws(cfg, 0, n_data=2, shape=(4, 8, 8), num_segments=boundaries.num_segments)
    batch = Batch(z0[d["idx"]], Cond(tokens=cond.tokens[d["idx"]]), d, boundaries)
    losses = training_step(model, cfg, batch, params=params, opts=opts, sync=ProcessGroup("cpu"),
                           precision=Precision("no", torch.device("cpu")))
    assert set(losses) == {"cd_reverse", "cd_forward", "preserve_forward", "preserve_reverse"}
    assert all(torch.isfinite(v) for v in losses.values())
    for name in lora.ADAPTERS:
        assert any(not torch.equal(a, b) for a, b in zip(before[name], params[name]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["icd", "ddim", "npi", "nti"])
def test_every_method_edits_on_cuda_in_fp16(tmp_path, scene, method):
    """Every editing method runs on a GPU in fp16 (NTI once failed there: a CPU mask met CUDA losses)."""
    base, icd = sd15.random_models(tmp_path / "tok", vocabulary=VOCAB, scale=10, image_size=64,
                                   dtype=torch.float16, device="cuda")
    image, caption = scene
    editor = Pipeline(icd, base)
    inv = editor.invert(image, [caption], method=method, steps=None if method == "icd" else 3)
    out = editor.edit(inv, [caption.replace("circle", "square")])
    assert out.images.shape == (1, 64, 64, 3) and out.nfe == (4 if method == "icd" else 3)
