import numpy as np
import pytest
from PIL import Image

from icd.imageio import ImageError, check_output, fit_image, load_image, save_image


def test_modes_are_converted_to_rgb(tmp_path):
    arr = (np.arange(64 * 64 * 4) % 256).astype(np.uint8).reshape(64, 64, 4)
    cases = {
        "rgba.png": Image.fromarray(arr, "RGBA"),
        "gray.png": Image.fromarray(arr[..., 0], "L"),
        "palette.png": Image.fromarray(arr[..., :3], "RGB").convert("P"),
        "g16.png": Image.fromarray(arr[..., 0].astype(np.uint16) * 257),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = load_image(tmp_path / name)
        assert out.mode == "RGB" and out.size == (64, 64), name
    g16 = np.asarray(load_image(tmp_path / "g16.png"))[..., 0]
    np.testing.assert_array_equal(g16, arr[..., 0])


@pytest.mark.parametrize("fit", ["resize", "center-crop", "pad"])
def test_fit_policies_make_squares(fit):
    im = Image.new("RGB", (90, 40), (10, 200, 30))
    out = fit_image(im, 64, fit)
    assert out.size == (64, 64)
    assert np.asarray(out)[32, 32].tolist() == [10, 200, 30]


def test_bad_files_raise_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    for name in ("missing.png", "empty.png", "corrupt.png", "truncated.png", "."):
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value)


def test_outputs_never_clobber(tmp_path):
    src = tmp_path / "in.png"
    save_image(np.zeros((8, 8, 3), np.uint8), src)
    with pytest.raises(ImageError, match="overwrite the input"):
        check_output(src, force=True, inputs=(src,))
    with pytest.raises(ImageError, match="--force"):
        check_output(src)
    with pytest.raises(ImageError, match="extension"):
        check_output(tmp_path / "x.txt")
    save_image(np.zeros((8, 8, 3), np.uint8), tmp_path / "new" / "deep" / "o.png")
    assert (tmp_path / "new" / "deep" / "o.png").is_file()
    assert not list(tmp_path.rglob(".*tmp*"))


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    import icd.imageio as imageio

    Image.new("L", (300, 300)).save(tmp_path / "big.png")  # a few hundred bytes that decode to 90 000 pixels
    monkeypatch.setattr(imageio, "MAX_PIXELS", 50_000)
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # Pillow's own guard (warns at 1x, errors at 2x)
    monkeypatch.setattr(imageio, "MAX_PIXELS", 10**9)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "big.png")


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an EXIF rotation loads upright (it was edited sideways before)."""
    upright = np.zeros((20, 40, 3), dtype=np.uint8)
    upright[:, :20] = 255  # left half white
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 40 x 20 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    im = load_image(tmp_path / "phone.jpg")
    assert im.size == (40, 20)
    arr = np.asarray(im).astype(int)
    assert arr[:, :20].mean() > 200 and arr[:, 20:].mean() < 50
