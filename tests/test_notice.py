"""The far-from-world notice (issue 25 §5): on the embedded 64x64 shapes model, an input whose size or content is far
from the world gets one line on stderr saying so and how to use Stable Diffusion; world renders never get it.

No photo is on disk (and none is downloaded): the natural-image stand-ins are synthetic noise, textures, gradients
and a sky-over-grass composite. docs/RELIABILITY.md, "Far-from-world notice", has the measured scores.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from icd import imageio, world
from icd.cli import main
from icd.imageio import flat_colour_coverage, flat_fraction, looks_like_shapes_world

WORLD_SEEDS = range(world.EVAL_SEED_START, world.EVAL_SEED_START + 300)


def world_renders() -> list[np.ndarray]:
    """900 held-out scenes (1, 2 and 3 objects) and the sources and targets of 240 edit cases."""
    out = [world.render(world.sample_scene(s, max_objects=k)) for s in WORLD_SEEDS for k in (1, 2, 3)]
    for kind in world.EDIT_KINDS:
        for s in range(world.EVAL_SEED_START, world.EVAL_SEED_START + 30):
            case = world.make_case(kind, s)
            out += [case.source, case.target]
    return out


def natural_like() -> dict[str, np.ndarray]:
    """Synthetic stand-ins for photos: noise, textures, gradients, a landscape-like composite (64x64 RGB)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    out = {"uniform noise": rng.integers(0, 256, (64, 64, 3))}
    for mean, std in ((128, 3), (128, 10), (60, 30), (200, 20)):
        out[f"gaussian noise {mean}+-{std}"] = mean + rng.normal(0, std, (64, 64, 3))
    for sigma in (1, 2, 4):
        blurred = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).filter(
            ImageFilter.GaussianBlur(sigma))
        a = np.asarray(blurred, float)
        out[f"texture (blurred noise, sigma {sigma})"] = (a - a.mean()) / a.std() * 50 + 128
    for lo, hi in ((0, 255), (64, 192), (100, 200)):
        ramp = lo + (hi - lo) * xx / 63
        out[f"horizontal gradient {lo}-{hi}"] = np.stack([ramp, ramp, ramp], -1)
        out[f"diagonal colour gradient {lo}-{hi}"] = np.stack([ramp, lo + (hi - lo) * yy / 63, 255 - ramp], -1)
    r = np.hypot(yy - 32, xx - 32) * 6
    out["radial gradient"] = np.stack([r, 255 - r, r / 2], -1)
    sky = np.stack([100 + yy, 150 + yy, np.full_like(yy, 230)], -1)
    grass = np.stack([90 + rng.normal(0, 20, yy.shape), 140 + rng.normal(0, 25, yy.shape),
                      60 + rng.normal(0, 15, yy.shape)], -1)
    out["sky over grass"] = np.where((yy > 36)[..., None], grass, sky)
    out["shapes over texture"] = np.where((np.hypot(yy - 30, xx - 30) < 12)[..., None], [220, 30, 30],
                                          out["texture (blurred noise, sigma 2)"])
    return {k: np.clip(np.rint(v), 0, 255).astype(np.uint8) for k, v in out.items()}


def test_no_world_render_is_far_from_the_world():
    renders = world_renders()
    assert len(renders) >= 200
    coverage = np.array([flat_colour_coverage(x) for x in renders])
    flat = np.array([flat_fraction(x) for x in renders])
    far = [i for i, x in enumerate(renders) if not looks_like_shapes_world(x)]
    assert far == []  # 0 false notices on 1 140 renders
    assert coverage.min() >= imageio.WORLD_MIN_COVERAGE + 0.1  # with margin
    assert flat.min() >= imageio.WORLD_MIN_FLAT + 0.2


@pytest.mark.parametrize("name", list(natural_like()))
def test_natural_like_images_are_far_from_the_world(name):
    assert not looks_like_shapes_world(natural_like()[name])


def _invert(path, tmp_path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["invert", str(path), "--prompt", "a large red circle on a gray background", "-o",
                     str(tmp_path / f"out-{path.stem}.png"), "--threads", "1"])
    return code, err.getvalue()


def test_the_cli_notice_is_one_line_on_stderr_and_keeps_the_exit_code(tmp_path):
    images = natural_like()
    texture = tmp_path / "texture.png"
    Image.fromarray(images["texture (blurred noise, sigma 2)"]).save(texture)
    big = tmp_path / "big-sky.png"
    Image.fromarray(images["sky over grass"]).resize((200, 150)).save(big)
    render = tmp_path / "render.png"
    Image.fromarray(world.make_case("color", 1).source).save(render)
    big_render = tmp_path / "big-render.png"
    Image.fromarray(world.render(world.sample_scene(7), res=128)).save(big_render)

    code, err = _invert(texture, tmp_path)
    assert code == 0
    assert len(err.splitlines()) == 1 and err.startswith("notice: the built-in model is a 64x64 shapes-world model")
    assert "many colours or texture" in err and "--model" in err and "docs/stable-diffusion.md" in err
    code, err = _invert(big, tmp_path)  # size and content: still one line
    assert code == 0 and len(err.splitlines()) == 1 and "200x150" in err and "texture" in err
    code, err = _invert(render, tmp_path)
    assert code == 0 and err == ""  # a world render: no notice
    code, err = _invert(big_render, tmp_path)  # a world render of another size: the size only
    assert code == 0 and len(err.splitlines()) == 1 and "128x128" in err and "texture" not in err
