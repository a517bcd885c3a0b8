"""Image input/output with clear errors: validated loading, resize policies, atomic writes that never clobber.

Loading accepts anything Pillow reads. RGBA / LA are composited on white, palette and grayscale images are converted
to RGB, 16-bit images are scaled to 8 bit. Non-square images follow a documented policy (`fit`):

- ``resize``: stretch to size x size (the reference implementation's behaviour);
- ``center-crop``: scale the short side to `size`, crop the centre square;
- ``pad``: scale the long side to `size`, pad with the edge colour to a square;
- ``aspect`` (Stable Diffusion families): keep the aspect ratio; scale to about size x size pixels with both sides a
  multiple of `multiple` (`aspect_size`). The output keeps the input's aspect ratio up to that rounding.

Errors raise `ImageError` with a one-line message (missing file, directory, empty, truncated or corrupt file, too
many pixels).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from icd.io import file_problem, folder_problem, name_problem, output_problem, shown

Fit = Literal["resize", "center-crop", "pad", "aspect"]
FITS: tuple[str, ...] = ("resize", "center-crop", "pad", "aspect")
MAX_PIXELS = 64_000_000  # decompression-bomb guard: larger images are refused


class ImageError(ValueError):
    """An image that cannot be read or written."""


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, or raise `ImageError`."""
    path = Path(path)
    problem = file_problem(path)  # a FIFO is refused before it is opened: reading it would block
    if problem == "not found":
        raise ImageError(f"image not found: {path}")
    if problem and "directory" in problem:
        raise ImageError(f"expected an image file, got a directory: {path}")
    if problem:
        raise ImageError(f"cannot read image {path}: {problem}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"image too large ({im.width}x{im.height} pixels > {MAX_PIXELS}): {path}")
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))  # a phone photo's EXIF rotation, applied
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"image refused as a decompression bomb: {path}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha composited on white, 16-bit scaled)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def aspect_size(width: int, height: int, *, size: int, multiple: int) -> tuple[int, int]:
    """(W, H) with W / H close to width / height, W * H close to size², both multiples of `multiple` (at least one
    multiple): a photo's size at a model's native resolution."""
    if width <= 0 or height <= 0 or size <= 0 or multiple <= 0:
        raise ValueError(f"aspect_size needs positive sizes, got {width}x{height}, size {size}, multiple {multiple}")
    scale = size / (width * height) ** 0.5
    return tuple(max(multiple, round(v * scale / multiple) * multiple) for v in (width, height))


def fit_image(im: Image.Image, size: int, fit: Fit = "resize", *, multiple: int = 8) -> Image.Image:
    """Make `im` RGB at the model's size following policy `fit` (see module docstring): size x size, or for
    ``aspect`` the `aspect_size` of the image."""
    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; choose from {', '.join(FITS)}")
    if fit == "aspect":
        target = aspect_size(im.width, im.height, size=size, multiple=multiple)
        return im if im.size == target else im.resize(target, Image.BICUBIC)
    if im.size == (size, size):
        return im
    if fit == "resize":
        return im.resize((size, size), Image.BICUBIC)
    if fit == "center-crop":
        return ImageOps.fit(im, (size, size), Image.BICUBIC)
    scale = size / max(im.size)
    inner = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    arr = np.asarray(inner)
    top, left = (size - inner.height) // 2, (size - inner.width) // 2
    padded = np.pad(arr, ((top, size - inner.height - top), (left, size - inner.width - left), (0, 0)), mode="edge")
    return Image.fromarray(padded)


def check_output(path: str | Path, *, force: bool = False, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Validate an output path before any work: never an input, never an existing file without `force`, never a
    name too long for its filesystem, never an existing device node, FIFO or socket (not even with `force`)."""
    if not str(path).strip():
        raise ImageError("the output path is empty")
    path = Path(path)
    problem = name_problem(path)  # first: stat() of an over-long name raises instead of answering
    if problem:
        raise ImageError(f"cannot write {shown(path)}: {problem}")
    if file_problem(path) == "a symbolic link loop":
        raise ImageError(f"output path is a symbolic link loop: {path}")
    for inp in inputs:
        if Path(inp).exists() and path.exists() and path.resolve() == Path(inp).resolve():
            raise ImageError(f"refusing to overwrite the input file {inp}")
    if path.is_dir():
        raise ImageError(f"output path is a directory: {path}")
    problem = output_problem(path)
    if problem:
        raise ImageError(f"output {path} is {problem}")
    if os.path.lexists(path) and not force:  # a dangling link too: writing would replace it
        raise ImageError(f"output exists: {path} (use --force to overwrite)")
    if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise ImageError(f"unsupported output extension {path.suffix!r} (use .png, .jpg, .webp or .bmp)")
    problem = folder_problem(path.parent)  # a full run must not end in "cannot write"
    if problem:
        raise ImageError(f"cannot write {path}: {problem}")
    return path


def save_image(image: Image.Image | np.ndarray, path: str | Path) -> Path:
    """Write atomically (temporary file in the same folder, then rename); creates parent folders. An existing
    directory, device node, FIFO or socket at `path` is refused (`icd.io.output_problem`), never replaced."""
    path = Path(path)
    problem = output_problem(path)
    if problem:
        raise ImageError(f"cannot write {shown(path)}: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ImageError(f"cannot write {path}: {e}") from None
    return path


def to_uint8(x) -> np.ndarray:
    """float tensor [N,3,H,W] in [-1, 1] -> uint8 [N,H,W,3]. Converted where the tensor lives (on a GPU: a quarter
    of the bytes cross to the host, in NHWC already); the same fp32 arithmetic on every device."""
    arr = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).contiguous()
    return np.ascontiguousarray(arr.cpu().numpy())


def to_tensor(images: np.ndarray):
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1] (a torch tensor)."""
    import torch  # imageio serves the CLI's input checks before torch is needed

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)



def flat_colour_coverage(image: np.ndarray, colours: int = 4, tolerance: int = 8) -> float:
    """The fraction of pixels of uint8 RGB `image` [H, W, 3] within `tolerance` grey levels (every channel) of its
    `colours` most common colours, taken greedily: each round the most common colour of the pixels left (4-bit
    bins, the bin's median as its centre) takes every left pixel near it. A shapes-world render (a flat background
    and up to 3 flat shapes with anti-aliased edges) scores 0.94 or more; noise, textures and wide gradients spread
    over many colours and score far less."""
    px = np.asarray(image, dtype=np.int16).reshape(-1, 3)
    left = np.ones(len(px), bool)
    for _ in range(colours):
        if not left.any():
            break
        rest = px[left]
        bins = (rest[:, 0] // 16) * 256 + (rest[:, 1] // 16) * 16 + rest[:, 2] // 16
        centre = np.median(rest[bins == np.bincount(bins).argmax()], axis=0)
        left &= np.abs(px - centre).max(axis=1) > tolerance
    return 1.0 - float(left.mean())


def flat_fraction(image: np.ndarray, tolerance: int = 3) -> float:
    """The fraction of pixels of uint8 RGB `image` that differ from their right and lower neighbours by at most
    `tolerance` grey levels in every channel (flat areas). A shapes-world render scores 0.87 or more; sensor-like
    noise, texture and gradients steeper than `tolerance` levels per pixel score near 0."""
    a = np.asarray(image, dtype=np.int16)
    down = np.abs(np.diff(a, axis=0)).max(axis=-1)[:, :-1]
    right = np.abs(np.diff(a, axis=1)).max(axis=-1)[:-1]
    return float(((down <= tolerance) & (right <= tolerance)).mean())


# Below either bar an image is far from the shapes world (docs/RELIABILITY.md, "Far-from-world notice": world
# renders score >= 0.944 and >= 0.875 on 900 held-out scenes of 1-3 objects).
WORLD_MIN_COVERAGE = 0.8
WORLD_MIN_FLAT = 0.6


def looks_like_shapes_world(image: np.ndarray) -> bool:
    """Whether uint8 RGB `image` looks like a render of the shapes world: a few flat colours, mostly flat areas."""
    return flat_colour_coverage(image) >= WORLD_MIN_COVERAGE and flat_fraction(image) >= WORLD_MIN_FLAT
