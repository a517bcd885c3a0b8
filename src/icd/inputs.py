"""The Python API's input layer (as `icd.cli` checks its options): each public entry of `icd.pipeline` passes its
arguments through these functions, which convert what is unambiguous and refuse the rest with a one-line
`TypeError` (wrong kind of value) or `ValueError` (right kind, unusable value) that names the argument and says
what it takes.

Images (`as_images`), one rule for every entry that takes pixels:

- uint8 numpy arrays, channels last: [H, W, C] is one image, [N, H, W, C] a batch, [H, W] one grey image;
  C = 3 (RGB), 1 (grey, repeated) or 4 (RGBA, composited on white as `icd.imageio.to_rgb` does for files).
  A numpy array that is not channels last ([1, 64, 64], [N, 3, H, W]) is refused: numpy's convention is HWC.
- int32 / int64 arrays (what ``np.array`` makes of Python ints) when every value lies in 0..255, taken exactly.
  Any other integer dtype (uint16: a 16-bit range), bool, and an out-of-range int64 array are refused.
- float arrays and tensors only with ``value_range=(0, 1)`` or ``(-1, 1)``, and only when every value is finite and
  inside it: [0, 1] and [0, 255] floats look alike, so the range is never guessed.
- torch tensors: uint8 / int / float by the same dtype rules, channels last (NHWC, HWC) or channels first (NCHW,
  CHW, torch's convention); a shape that reads both ways is refused.
- PIL images (any mode, converted with `icd.imageio.to_rgb`, the command line's reader) and lists or tuples of
  single images in any of the forms above, all of one size.

Text: a bare string is one prompt (``"a cat"`` is ``["a cat"]``), as `icd.editing.edit.flatten_targets` has always
taken one target; otherwise a list or tuple of strings. Numbers: a seed is an int in 0..2**64 - 1 (what
`torch.Generator.manual_seed` takes); counts are positive ints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icd.imageio import to_rgb
from icd.io import folder_problem, name_problem, output_problem, pair_paths, shown

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
VALUE_RANGES = ((0, 1), (-1, 1))  # the float ranges `as_images` takes, stated by the caller
_CHANNELS = (1, 3, 4)
_INT_DTYPES = (np.int32, np.int64)
IMAGES_TAKE = ("uint8 arrays [H, W, 3] / [N, H, W, 3] (channels last), PIL images, lists of them, or torch tensors "
               "(uint8, or float with value_range)")


def _kind(value) -> str:
    return type(value).__name__


def _rgb(arr: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] (C in 1, 3, 4) -> [..., H, W, 3]: grey repeated, RGBA composited on white."""
    if arr.shape[-1] == 3:
        return arr
    if arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    flat = arr.reshape(-1, *arr.shape[-3:])
    out = np.stack([np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(im), "RGBA"))) for im in flat])
    return out.reshape(*arr.shape[:-1], 3)


def _layout(shape: tuple[int, ...], *, torch_tensor: bool, name: str) -> str:
    """'last' or 'first' (channel axis) of an image array of `shape`; ValueError when it is neither (or both)."""
    last = shape[-1] in _CHANNELS
    first = torch_tensor and shape[-3] in _CHANNELS
    if last and not first:
        return "last"
    if first and not last:
        return "first"
    if last and first:
        raise ValueError(f"{name}: a tensor of shape {tuple(shape)} reads as channels first and channels last; pass "
                         "[N, 3, H, W] or [N, H, W, 3] with H, W not 1, 3 or 4")
    hint = (" (channels first? numpy images are channels last: np.moveaxis(x, -3, -1))" if shape[-3] in _CHANNELS
            else " (a batch of grey images? add a channel axis: x[..., None])")
    raise ValueError(f"{name} must be [H, W, C] or [N, H, W, C] with C = 1, 3 or 4 channels, got shape "
                     f"{tuple(shape)}{hint if not torch_tensor else ''}")


def _pixels(arr: np.ndarray, *, value_range, name: str) -> np.ndarray | torch.Tensor:
    """uint8 channels-last pixels, or float [-1, 1] (a float input with its stated range); any dtype -> checked."""
    if arr.dtype == np.bool_:
        raise TypeError(f"{name} is a bool array; images are uint8 0..255 ({IMAGES_TAKE})")
    if np.issubdtype(arr.dtype, np.floating):
        if value_range is None:
            raise TypeError(f"{name} is a {arr.dtype} array: pass uint8 0..255 (e.g. (x * 255).round().astype("
                            "np.uint8) for [0, 1]) or state the range with value_range=(0, 1) or (-1, 1)")
        lo, hi = value_range
        if arr.size and not np.isfinite(arr).all():
            raise ValueError(f"{name} holds NaN or infinite values; images must be finite")
        if arr.size and not (arr.min() >= lo and arr.max() <= hi):
            raise ValueError(f"{name} must lie in [{lo}, {hi}] (value_range), got values in "
                             f"[{arr.min():g}, {arr.max():g}]")
        x = arr.astype(np.float32)
        return x * 2.0 - 1.0 if lo == 0 else x
    if value_range is not None:
        raise ValueError(f"value_range applies to float images; {name} is {arr.dtype} (uint8 is 0..255)")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype in _INT_DTYPES:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{name} must lie in 0..255 (uint8 pixels), got {arr.dtype} values in "
                             f"{arr.min()}..{arr.max()}")
        return arr.astype(np.uint8)
    raise TypeError(f"{name} is a {arr.dtype} array; images are uint8 0..255"
                    + (" (16-bit pixels: x >> 8 gives uint8)" if arr.dtype == np.uint16 else ""))


def _one_or_batch(x, *, value_range, name: str, single: bool) -> np.ndarray | torch.Tensor:
    """A numpy array / tensor of one image (or a batch unless `single`) -> [N, H, W, 3] uint8 or [N, 3, H, W] float."""
    is_tensor = isinstance(x, torch.Tensor)
    if is_tensor:
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64) else x
    arr = x.numpy() if is_tensor else x
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim not in (3, 4) or (single and arr.ndim == 4):
        what = "one image [H, W, C]" if single else "[H, W, C] or [N, H, W, C]"
        raise ValueError(f"{name} must be {what}, got shape {tuple(arr.shape)}")
    if _layout(arr.shape, torch_tensor=is_tensor, name=name) == "first":
        arr = np.moveaxis(arr, -3, -1)
    if arr.ndim == 3:
        arr = arr[None]
    if 0 in arr.shape:
        raise ValueError(f"{name} is empty (shape {tuple(arr.shape)}): at least one image of at least 1 x 1 pixels")
    px = _pixels(arr, value_range=value_range, name=name)
    if px.dtype == np.uint8:
        return np.ascontiguousarray(_rgb(px))
    if px.shape[-1] != 3:  # grey or RGBA floats: as uint8 is, grey repeated, alpha dropped only if opaque
        if px.shape[-1] == 4 and not (px[..., 3] >= 1.0 - 1e-6).all():
            raise ValueError(f"{name} has transparent pixels: composite RGBA floats yourself, or pass uint8")
        px = np.repeat(px, 3, axis=-1) if px.shape[-1] == 1 else px[..., :3]
    return torch.from_numpy(np.ascontiguousarray(px)).permute(0, 3, 1, 2)


def as_images(images, *, value_range: tuple[float, float] | None = None, name: str = "images"
              ) -> np.ndarray | torch.Tensor:
    """`images` as uint8 [N, H, W, 3] (numpy) or, for float input with `value_range`, float [N, 3, H, W] in
    [-1, 1] (torch): what `LatentDiffusion.preprocess` takes. The module docstring gives the rule; anything else is
    a TypeError / ValueError naming `name`. A uint8 [N, H, W, 3] array comes back as it is (no copy)."""
    if value_range is not None:
        if not (isinstance(value_range, tuple | list) and len(value_range) == 2
                and tuple(value_range) in VALUE_RANGES):
            raise ValueError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}")
        value_range = tuple(value_range)
    if isinstance(images, Image.Image):
        return np.asarray(to_rgb(images))[None]
    if isinstance(images, np.ndarray | torch.Tensor):
        return _one_or_batch(images, value_range=value_range, name=name, single=False)
    if isinstance(images, str | bytes | os.PathLike):
        raise TypeError(f"{name} takes pixels, not a path ({_kind(images)}): load it with icd.imageio.load_image")
    if not isinstance(images, list | tuple):
        raise TypeError(f"{name} must be {IMAGES_TAKE}; got {_kind(images)}")
    if not images:
        raise ValueError(f"{name} is an empty list: pass at least one image")
    rows = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            rows.append(np.asarray(to_rgb(im))[None])
        elif isinstance(im, np.ndarray | torch.Tensor):
            rows.append(_one_or_batch(im, value_range=value_range, name=f"{name}[{i}]", single=True))
        else:
            raise TypeError(f"{name}[{i}] must be one image (a uint8 array [H, W, 3], a PIL image or a tensor); "
                            f"got {_kind(im)}")
        if type(rows[-1]) is not type(rows[0]):
            raise TypeError(f"{name} mixes float and uint8 images; pass one kind")
        size, first = tuple(rows[-1].shape[1:]), tuple(rows[0].shape[1:])
        if size != first:
            raise ValueError(f"{name}[{i}] has shape {size}, {name}[0] {first}: a batch takes images of one size")
    return np.concatenate(rows) if isinstance(rows[0], np.ndarray) else torch.cat(rows)


def as_texts(texts, *, name: str) -> list[str]:
    """`texts` as a list of strings: a bare string is one; otherwise a list / tuple of strings (TypeError naming
    the bad entry, ValueError for an empty list). Empty strings are left to `check_prompts` (`PromptError`)."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence) or isinstance(texts, bytes):
        raise TypeError(f"{name} must be a string or a list of strings, got {_kind(texts)}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty: pass at least one prompt")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a string, got {_kind(t)}")
    return texts


def as_targets(targets, *, name: str = "target_prompts") -> list[str | list[str]]:
    """Target prompts: a string, or a list with one entry per source that is a string or a non-empty list of
    strings (several targets of that source)."""
    if isinstance(targets, str):
        return [targets]
    if not isinstance(targets, Sequence) or isinstance(targets, bytes):
        raise TypeError(f"{name} must be a string or a list (one string or list of strings per source), got "
                        f"{_kind(targets)}")
    out: list[str | list[str]] = []
    for i, entry in enumerate(targets):
        if isinstance(entry, str):
            out.append(entry)
            continue
        if not isinstance(entry, Sequence) or isinstance(entry, bytes):
            raise TypeError(f"{name}[{i}] must be a string or a list of strings, got {_kind(entry)}")
        if not entry:
            raise ValueError(f"{name}[{i}] is an empty list: give that source at least one target prompt")
        out.append(as_texts(entry, name=f"{name}[{i}]"))
    if not out:
        raise ValueError(f"{name} is empty: pass one target (or list of targets) per source")
    return out


def as_int(value, *, name: str, low: int, high: int | None = None) -> int:
    """`value` as a Python int in low..high (numpy integers taken); TypeError / ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an integer, got {_kind(value)} {value!r}"[:200])
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{'2**64 - 1' if high == MAX_SEED else high}"
        raise ValueError(f"{name} must be an integer {bound}, got {value}"[:200])
    return value


def as_seed(seed, *, count: int = 1, name: str = "seed") -> int:
    """A seed in 0..2**64 - 1 such that the `count` seeds seed, seed + 1, ... all are."""
    seed = as_int(seed, name=name, low=0, high=MAX_SEED)
    if seed + count - 1 > MAX_SEED:
        raise ValueError(f"{name} + {count - 1} (one seed per image) passes 2**64 - 1: use a smaller {name}")
    return seed


def check_blend_words(blend_words, n_targets: int, *, name: str = "blend_words") -> None:
    """P2P local blend words: None, a pair (source words, target words) of lists of words, or a list with one
    such pair per target; at least one word per pair (a side may be empty: a word in one prompt only)."""
    if blend_words is None:
        return
    pairs = blend_words if isinstance(blend_words, list) else [blend_words]
    if isinstance(blend_words, list) and len(pairs) != n_targets:
        raise ValueError(f"{name}: {len(pairs)} (source words, target words) pairs for {n_targets} target prompts")
    for pair in pairs:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            got = repr(pair) if isinstance(pair, str) else f"{_kind(pair)} of {len(pair)}" if isinstance(
                pair, Sequence) else _kind(pair)
            raise ValueError(f"{name} must be a pair (source words, target words), e.g. (('red',), ('blue',)), "
                             f"or a list of pairs; got {got}"[:300])
        for side, words in zip(("source", "target"), pair):
            if isinstance(words, str) or not isinstance(words, Sequence) or not all(
                    isinstance(w, str) and w.strip() for w in words):
                raise TypeError(f"{name}: the {side} words must be a list of non-empty strings, got {words!r}"[:300])
        if not pair[0] and not pair[1]:
            raise ValueError(f"{name} names no word (both sides empty): pass None for no local blend")


def check_finite(value, *, name: str) -> None:
    """ValueError unless `value` is None or a finite real number."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float | np.floating)
                              or not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}"[:200])


def save_paths(path, *, name: str = "path") -> tuple[Path, Path]:
    """The (JSON, safetensors) files a record saved under `path` writes (`icd.io.pair_paths`), checked before
    anything is written: a non-empty file name, not too long, no existing folder / device / FIFO in their place,
    and a folder that can be created and written. ValueError naming `name` otherwise."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name} must be a str or Path, got {_kind(path)}")
    text = os.fspath(path)
    if not str(text).strip() or Path(text).name in ("", ".", "..") or str(text).endswith(os.sep):
        raise ValueError(f"{name} {str(text)!r} names no file: give a file name such as 'inversions/cat'")
    files = pair_paths(text)
    for f in files:
        problem = name_problem(f) or output_problem(f)
        if problem:
            raise ValueError(f"{name} {shown(f)}: {problem}")
    problem = folder_problem(files[0].parent)
    if problem:
        raise ValueError(f"{name} {shown(text)}: {problem}")
    return files
