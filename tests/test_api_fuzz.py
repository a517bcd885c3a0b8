"""Property-based fuzzing of the Python API (issue 34), as tests/test_fuzz.py drives the command line: random images
(dtypes, shapes, ranges, containers), prompts, seeds, batch sizes, targets, blend words and save paths. Every input
is either taken or refused with a TypeError / ValueError that names the argument; nothing else escapes, a refused
call runs no network step, and a refused save writes nothing.

The pipeline calls pass a `should_stop` that is True at once, so an accepted input ends in `Cancelled` before its
first network call: the fuzz exercises every check at the cost of a VAE encode. Each test states its example budget;
docs/RELIABILITY.md reports the counts.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from icd import world
from icd.editing.controllers import P2PControls
from icd.editing.edit import EditControls
from icd.inputs import as_images
from icd.models.base import PromptError
from icd.pipeline import Pipeline
from icd.samplers import Cancelled

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FUZZ_PIPE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = [np.uint8, np.int64, np.int32, np.uint16, np.int8, np.float16, np.float32, np.float64, np.bool_]
RANGES = [None, None, None, None, (0, 1), (-1, 1), (0, 255), (1, 0), "x"]  # None: the common call
WORDS = world.vocabulary()[:20]
CAPTIONS = [world.make_case("color", world.EVAL_SEED_START + i).source_prompt for i in range(3)]


def _stop():
    return True


def _names(e: BaseException, *names: str) -> bool:
    return any(n in str(e) for n in names)


@pytest.fixture(scope="module")
def pipe(random_icd_dir):
    return Pipeline.from_pretrained(random_icd_dir)


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 3)


@st.composite
def valid_images(draw):
    """(images, value_range) that `as_images` takes: uint8 image-like arrays / tensors, or floats in their range."""
    h, w, c = draw(st.integers(1, 16)), draw(st.integers(1, 16)), draw(st.sampled_from([3, 1, 4]))
    shape = draw(st.sampled_from([(h, w, c), (draw(st.integers(1, 3)), h, w, c)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["uint8", "int64", "float01", "float11"]))
    if kind in ("uint8", "int64"):
        return rng.integers(0, 256, size=shape).astype(kind), None
    lo = 0 if kind == "float01" else -1
    x = rng.uniform(lo, 1, size=shape).astype(np.float32)
    if c == 4:
        x[..., 3] = 1.0  # float RGBA is taken when opaque
    as_tensor = draw(st.booleans()) and len(shape) == 4 and min(h, w) > 4  # else HWC / CHW could both read it
    return (torch.from_numpy(x) if as_tensor else x), (lo, 1)


@st.composite
def arrays(draw):
    side, c, n = st.sampled_from([8, 16, 3, 1, 0]), st.sampled_from([3, 1, 4]), st.sampled_from([1, 2, 0])
    shape = draw(st.one_of(  # image-like shapes (HWC, NHWC, NCHW, HW) half the time, any shape otherwise
        st.tuples(side, side, c), st.tuples(n, side, side, c), st.tuples(n, c, side, side), st.tuples(side, side),
        st.lists(st.sampled_from([8, 0, 1, 2, 3, 4, 5]), min_size=0, max_size=5).map(tuple)))
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = draw(st.sampled_from([(0, 255), (0, 1), (-300, 300), (0, 65535)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(lo, hi, size=shape)
    if draw(st.booleans()):
        values = np.round(values)
    with np.errstate(invalid="ignore", over="ignore"):
        arr = np.asarray(values).astype(dtype)
    return torch.from_numpy(arr.copy()) if draw(st.booleans()) and dtype != np.uint16 else arr


@FUZZ
@given(x=arrays(), value_range=st.sampled_from(RANGES), wrap=st.sampled_from(["bare", "list", "tuple"]))
def test_any_array_is_converted_or_refused_naming_images(x, value_range, wrap):
    """Budget: 60 examples. Accepted: uint8 [N, H, W, 3] or float [N, 3, H, W] in [-1, 1]; refused: one line
    naming `images` (or `value_range`). A float, bool or uint16 input is never taken without its stated range."""
    _check_as_images(x, value_range, wrap)


@FUZZ
@given(xr=valid_images(), wrap=st.sampled_from(["bare", "list", "tuple"]))
def test_valid_images_in_any_form_are_taken(xr, wrap):
    """Budget: 60 examples, every one accepted (a list takes one image per entry)."""
    x, value_range = xr
    assert _check_as_images(x if wrap == "bare" or x.ndim == 3 else x[0], value_range, wrap) == "accepted"


def _check_as_images(x, value_range, wrap) -> str:
    """'accepted' or 'refused', after checking what `as_images` returned or the one line it raised."""
    images = x if wrap == "bare" else [x] if wrap == "list" else (x,)
    try:
        out = as_images(images, value_range=value_range)
    except (TypeError, ValueError) as e:
        assert _names(e, "images", "value_range") and "\n" not in str(e), e
        event(f"refused: {type(e).__name__}")
        return "refused"
    event("accepted")
    dtype = x.dtype if isinstance(x, np.ndarray) else torch.empty(0, dtype=x.dtype).numpy().dtype
    assert dtype not in (np.bool_, np.uint16, np.int8)
    if isinstance(out, np.ndarray):
        assert out.dtype == np.uint8 and out.ndim == 4 and out.shape[-1] == 3 and out.shape[0] >= 1
        assert value_range is None and not np.issubdtype(dtype, np.floating)
    else:
        assert out.ndim == 4 and out.shape[1] == 3 and out.is_floating_point()
        assert value_range in ((0, 1), (-1, 1)) and bool(out.abs().max() <= 1.0)
    return "accepted"


texts = st.one_of(st.sampled_from(CAPTIONS), st.none(), st.integers(), st.text(max_size=12), st.sampled_from(WORDS),
                  st.builds(" ".join, st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)))
prompt_args = st.one_of(texts, st.lists(texts, max_size=3), st.lists(st.lists(texts, max_size=2), max_size=2))
seeds = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([0, 2**64 - 1, 2**64]), st.text(max_size=3),
                  st.floats(allow_nan=True), st.booleans(), st.none())


@FUZZ_PIPE
@given(prompts=prompt_args, seed=seeds, n=st.integers(0, 2))
def test_invert_takes_or_names_each_argument(pipe, case, prompts, seed, n):
    """Budget: 30 examples."""
    before = pipe.model.counter.calls
    try:
        pipe.invert(np.repeat(case.source[None], n, axis=0), prompts, seed=seed, should_stop=_stop)
    except Cancelled:
        event("accepted")
    except PromptError as e:  # an empty prompt or a word outside the world's vocabulary
        assert "prompt" in str(e) or "word" in str(e), e
    except (TypeError, ValueError) as e:
        assert _names(e, "images", "prompts", "seed"), e
    assert pipe.model.counter.calls == before


@FUZZ_PIPE
@given(prompts=prompt_args, seed=seeds, batch_size=st.one_of(st.integers(-2, 3), st.floats(0, 3), st.text(max_size=2)))
def test_generate_takes_or_names_each_argument(pipe, prompts, seed, batch_size):
    """Budget: 30 examples."""
    try:
        pipe.generate(prompts, seed=seed, batch_size=batch_size, should_stop=_stop)
    except Cancelled:
        event("accepted")
    except PromptError as e:
        assert "prompt" in str(e) or "word" in str(e), e
    except (TypeError, ValueError) as e:
        assert _names(e, "prompts", "seed", "batch_size"), e


words = st.one_of(st.sampled_from(["red", "blue", "triangle", "zebra", ""]), st.none(), st.integers())
sides = st.one_of(st.lists(words, max_size=2).map(tuple), words)
blends = st.one_of(st.none(), st.tuples(sides, sides), st.tuples(sides), sides,
                   st.lists(st.tuples(sides, sides), max_size=2))
controls = st.one_of(st.none(), st.text(max_size=3), st.integers(), blends.map(
    lambda b: EditControls(p2p=P2PControls(blend_words=b))))


@FUZZ_PIPE
@given(targets=prompt_args, controls=controls)
def test_edit_takes_or_names_each_argument(pipe, case, targets, controls):
    """Budget: 30 examples."""
    inv = _inversion(pipe, case)
    try:
        pipe.edit(inv, targets, controls, should_stop=_stop)
    except Cancelled:
        event("accepted")
    except PromptError as e:
        assert "prompt" in str(e) or "word" in str(e), e
    except (TypeError, ValueError) as e:
        assert _names(e, "target_prompts", "controls", "blend", "target entries"), e


_cache: dict = {}


def _inversion(pipe, case):
    if "inv" not in _cache:
        _cache["inv"] = pipe.invert(case.source[None], [case.source_prompt])
    return _cache["inv"]


names = st.one_of(st.sampled_from(["", ".", "/", "/proc/x", "a/", "run.v1", "inv.json", "x" * 300, "a/b/c",
                                   "dev", "taken"]),
                  st.text(alphabet="ab./-_ ", max_size=12).filter(lambda t: ".." not in t))  # stays in its folder


@FUZZ
@given(name=names)
def test_save_writes_both_files_or_names_path_and_writes_nothing(pipe, case, tmp_path_factory, name):
    """Budget: 60 examples."""
    folder = tmp_path_factory.mktemp("save")
    (folder / "taken.json").mkdir()
    (folder / "dev.json").symlink_to(os.devnull)
    before = set(_tree(folder))
    path = name if name in ("", "/", "/proc/x") else f"{folder}/{name}"  # never a path outside `folder` but those
    try:
        out = _inversion(pipe, case).save(path)
    except (TypeError, ValueError) as e:
        assert "path" in str(e) and "\n" not in str(e), e
        assert set(_tree(folder)) == before
        event("refused")
        return
    event("written")
    assert out.is_file() and out.name.endswith(".json") and out.with_name(out.name[:-5] + ".safetensors").is_file()


def _tree(folder):
    return [str(p) for p in folder.rglob("*")]
