"""MS-SSIM (icd.metrics.ms_ssim) and the weight-dependent metrics of icd.bench.optional_metrics, on tiny random
models built offline: LPIPS from random AlexNet/lin tensors, a 2-layer CLIP and a 2-layer DINOv2."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from icd.bench.lpips import ALEXNET_CONVS, LPIPS_CHANNELS
from icd.bench.optional_metrics import (
    NO_CLIP,
    NO_DINO,
    NO_LPIPS,
    Skipped,
    load_optional_metrics,
)
from icd.metrics import _as_nchw, _ssim_terms, ms_ssim, ms_ssim_num_scales, ssim

WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog"]


def _images(seed: int, n: int = 2, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _smooth(seed: int, n: int = 3, size: int = 64) -> np.ndarray:
    """Smooth random images (low-frequency content), where SSIM behaves like on natural images."""
    rng = np.random.default_rng(seed)
    coarse = torch.as_tensor(rng.uniform(0, 255, (n, 3, size // 8, size // 8)))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 255).round().permute(
        0, 2, 3, 1).numpy().astype(np.uint8)


def _noisy(x: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    return np.clip(x + np.random.default_rng(seed).normal(0, sigma, x.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------------- MS-SSIM


def test_ms_ssim_identity_noise_and_range():
    x = _smooth(0)
    assert np.array_equal(ms_ssim(x, x), np.ones(len(x)))
    values = [ms_ssim(x, _noisy(x, s)) for s in (5, 20, 60)]
    assert all(v.shape == (3,) for v in values)
    assert (values[0] > values[1]).all() and (values[1] > values[2]).all()
    assert np.allclose(ms_ssim(x, _noisy(x, 20)), ms_ssim(_noisy(x, 20), x))  # symmetric
    r = ms_ssim(_images(1, 4), _images(2, 4))  # unrelated noise images: cs near 0, clamped -> still in [0, 1]
    assert np.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()


def test_ms_ssim_scale_count_for_small_images():
    assert ms_ssim_num_scales(64, 64) == 3  # 64, 32, 16 >= 11 > 8
    assert ms_ssim_num_scales(32, 48) == 2
    assert ms_ssim_num_scales(11, 11) == 1 and ms_ssim_num_scales(10, 64) == 0
    assert ms_ssim_num_scales(256, 256) == 5  # capped at the 5 weights of Wang et al. 2003
    x = _smooth(3, n=2)
    y = _noisy(x, 25)
    assert np.array_equal(ms_ssim(x, y), ms_ssim(x, y, scales=3))
    assert not np.allclose(ms_ssim(x, y), ms_ssim(x, y, scales=2))
    with pytest.raises(ValueError, match="scales=4"):
        ms_ssim(x, y, scales=4)
    with pytest.raises(ValueError, match="smaller than"):
        ms_ssim(x[:, :8, :8], y[:, :8, :8])


def test_ms_ssim_matches_its_definition():
    """3 scales on 64x64: cs_1^w1 cs_2^w2 SSIM_3^w3 with the first 3 weights renormalised and 2x2 average pooling."""
    x = _smooth(4, n=2)
    y = _noisy(x, 15)
    w = np.array([0.0448, 0.2856, 0.3001])
    w = w / w.sum()
    a, b = _as_nchw(x), _as_nchw(y)
    expected = np.ones(2)
    for j in range(3):
        ln, ld, cn, cd = _ssim_terms(a, b)
        term = (cn / cd) if j < 2 else (ln * cn) / (ld * cd)
        expected *= term.mean(dim=(1, 2, 3)).numpy() ** w[j]
        a, b = torch.nn.functional.avg_pool2d(a, 2), torch.nn.functional.avg_pool2d(b, 2)
    assert np.allclose(ms_ssim(x, y), expected, rtol=1e-12)


def test_single_scale_ms_ssim_is_plain_ssim():
    """One scale with weight 1: the coarsest-scale term is mean(l * cs), i.e. exactly the (unmasked) mean SSIM."""
    x = _smooth(5)
    y = _noisy(x, 20)
    assert np.allclose(ms_ssim(x, y, scales=1, weights=(1.0,)), ssim(x, y), rtol=1e-12)
    assert np.allclose(ms_ssim(x, y, scales=1), ssim(x, y), rtol=1e-12)  # first weight renormalised to 1


# --------------------------------------------------------------------------------------------------------- LPIPS


def _lpips_tensors(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    alex, lins = {}, {}
    for i, (out, inp, k, _, _) in ALEXNET_CONVS.items():
        alex[f"features.{i}.weight"] = torch.randn(out, inp, k, k, generator=g) * (2.0 / (inp * k * k)) ** 0.5
        alex[f"features.{i}.bias"] = torch.randn(out, generator=g) * 0.01
    for i, c in enumerate(LPIPS_CHANNELS):
        lins[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g) / c  # LPIPS keeps them >= 0
    return alex, lins


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> str:
    alex, lins = _lpips_tensors()
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.safetensors"
    save_file({**alex, **lins}, str(path))
    return str(path)


def test_lpips_identity_positive_symmetric(lpips_file):
    metrics, skipped = load_optional_metrics(lpips=lpips_file)
    assert "lpips" in metrics and metrics["lpips"].name == "lpips"
    assert [s.metric for s in skipped] == ["clip_t", "clip_i", "dino"]
    lp = metrics["lpips"]
    x, y = _images(0, 3), _images(1, 3)
    assert np.array_equal(lp(x, x), np.zeros(3))
    d = lp(x, y)
    assert d.shape == (3,) and d.dtype == np.float64 and np.isfinite(d).all() and (d > 0).all()
    assert np.allclose(d, lp(y, x), rtol=1e-5)
    assert (lp(x, _noisy(x, 5)) < d).all()  # a slightly noisy copy is closer than an unrelated image
    small = lp(x[:, :32, :32], y[:, :32, :32])  # upsampled to 64 px
    assert small.shape == (3,) and np.isfinite(small).all() and (small > 0).all()


def test_lpips_from_a_pth_and_safetensors_pair(tmp_path, lpips_file):
    alex, lins = _lpips_tensors()
    torch.save({**alex, "classifier.1.weight": torch.zeros(2, 2)}, tmp_path / "alexnet.pth")  # torchvision layout
    save_file(lins, str(tmp_path / "lin.safetensors"))
    pair, skipped = load_optional_metrics(lpips=f"{tmp_path / 'alexnet.pth'}, {tmp_path / 'lin.safetensors'}")
    assert "lpips" in pair, skipped
    x, y = _images(2), _images(3)
    single, _ = load_optional_metrics(lpips=lpips_file)
    assert np.allclose(pair["lpips"](x, y), single["lpips"](x, y))


def test_lpips_missing_or_invalid_weights_are_skipped(tmp_path):
    metrics, skipped = load_optional_metrics()
    assert metrics == {}
    assert Skipped("lpips", NO_LPIPS) in skipped
    assert Skipped("clip_t", NO_CLIP) in skipped and Skipped("clip_i", NO_CLIP) in skipped
    assert Skipped("dino", NO_DINO) in skipped

    metrics, skipped = load_optional_metrics(lpips=str(tmp_path / "nope.safetensors"))
    assert "lpips" not in metrics and "not found" in skipped[0].reason

    save_file({"foo.weight": torch.zeros(3)}, str(tmp_path / "wrong.safetensors"))
    metrics, skipped = load_optional_metrics(lpips=str(tmp_path / "wrong.safetensors"))
    assert "lpips" not in metrics and skipped[0].metric == "lpips" and "lacks keys" in skipped[0].reason

    alex, lins = _lpips_tensors()
    alex["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    save_file({**alex, **lins}, str(tmp_path / "shapes.safetensors"))
    metrics, skipped = load_optional_metrics(lpips=str(tmp_path / "shapes.safetensors"))
    assert "lpips" not in metrics and "wrong shapes" in skipped[0].reason

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    metrics, skipped = load_optional_metrics(lpips=str(tmp_path / "garbage.pth"))
    assert "lpips" not in metrics and "cannot read" in skipped[0].reason and "\n" not in skipped[0].reason


# ----------------------------------------------------------------------------------------------------- CLIP, DINO


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from icd.models.tokenizer import write_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "clip"
    write_tokenizer(folder, WORDS, max_length=16)
    tok = CLIPTokenizer.from_pretrained(folder)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(common, vocab_size=1000, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(common, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dino") / "dino"
    config = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          mlp_ratio=2)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_clip_image_and_text_scores(clip_dir):
    metrics, skipped = load_optional_metrics(clip=str(clip_dir))
    assert {"clip_t", "clip_i"} <= set(metrics) and not [s for s in skipped if s.metric.startswith("clip")]
    x, y = _images(0, 3), _images(1, 3)
    same = metrics["clip_i"](x, x)
    assert same.shape == (3,) and np.allclose(same, 1.0, atol=1e-6)
    other = metrics["clip_i"](x, y)
    assert np.isfinite(other).all() and (np.abs(other) <= 1 + 1e-6).all() and not np.allclose(other, 1.0)
    t = metrics["clip_t"](x, ["a photo of a red cat", "a blue dog", "a cat"])
    assert t.shape == (3,) and np.isfinite(t).all() and (np.abs(t) <= 100 + 1e-4).all()
    assert np.allclose(metrics["clip_t"](x, "a red cat"), metrics["clip_t"](x, ["a red cat"] * 3), atol=1e-5)
    non_square = np.random.default_rng(5).integers(0, 256, (3, 40, 56, 3)).astype(np.uint8)  # resize + crop
    assert np.isfinite(metrics["clip_i"](non_square, x)).all()
    with pytest.raises(ValueError, match="prompts"):
        metrics["clip_t"](x, ["one prompt", "two"])


def test_dino_similarity(dino_dir):
    metrics, skipped = load_optional_metrics(dino=str(dino_dir))
    assert "dino" in metrics and metrics["dino"].name == "dino"
    x, y = _images(0, 3), _images(1, 3)
    same = metrics["dino"](x, x)
    assert same.shape == (3,) and np.allclose(same, 1.0, atol=1e-6)
    other = metrics["dino"](x, y)
    assert np.isfinite(other).all() and not np.allclose(other, 1.0)


def test_missing_or_wrong_model_folders_are_skipped(tmp_path, clip_dir, dino_dir):
    metrics, skipped = load_optional_metrics(clip=str(tmp_path / "none"), dino=str(tmp_path / "none"))
    assert metrics == {}
    reasons = {s.metric: s.reason for s in skipped}
    assert "not found" in reasons["clip_t"] and "not found" in reasons["clip_i"] and "not found" in reasons["dino"]

    metrics, skipped = load_optional_metrics(clip=str(dino_dir), dino=str(clip_dir))  # swapped: both unusable
    assert metrics == {}
    reasons = {s.metric: s.reason for s in skipped}
    assert {"clip_t", "clip_i", "dino", "lpips"} == set(reasons)
    assert all(r and "\n" not in r for r in reasons.values())

    (tmp_path / "empty").mkdir()
    metrics, skipped = load_optional_metrics(clip=str(tmp_path / "empty"))
    assert metrics == {} and "cannot load CLIP" in {s.metric: s.reason for s in skipped}["clip_i"]
