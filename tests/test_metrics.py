import numpy as np
import pytest

from icd.metrics import psnr, ssim, ssim_map


def test_psnr_is_per_image_and_clamped():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 10
    p = psnr(a, b)
    assert p[0] == 100.0
    assert p[1] == pytest.approx(10 * np.log10(255**2 / 100))


def test_masked_psnr_counts_only_selected_pixels():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    b = a.copy()
    b[0, :4] = 50  # top half differs
    mask = np.zeros((8, 8), bool)
    mask[4:] = True
    assert psnr(a, b, mask)[0] == 100.0
    assert psnr(a, b, ~mask)[0] == pytest.approx(10 * np.log10(255**2 / 2500))
    with pytest.raises(ValueError, match="no pixels"):
        psnr(a, b, np.zeros((8, 8), bool))


def test_ssim_identity_and_monotone_in_noise():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
    assert np.allclose(ssim(a, a), 1.0)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    values = [ssim(a, n).mean() for n in noisy]
    assert values[0] > values[1] > values[2]
    assert np.allclose(ssim(a, noisy[1]), ssim(noisy[1], a))  # symmetric


def test_ssim_of_flat_images_is_the_luminance_term():
    """Constant images have zero variance, so SSIM reduces to (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)."""
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 140, np.uint8)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1) * c2 / c2
    assert ssim_map(a, b).shape == (1, 16, 16)
    assert ssim(a, b)[0] == pytest.approx(expected, rel=1e-9)


def test_masked_ssim_ignores_pixels_outside_the_mask():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 32, 32, 3)).astype(np.uint8)
    b = a.copy()
    b[0, :, :8] = 0  # left stripe changed
    mask = np.zeros((32, 32), bool)
    mask[:, 16:] = True  # far from the stripe (window radius 5)
    assert ssim(a, b, mask)[0] == pytest.approx(1.0)
    assert ssim(a, b)[0] < 0.9
