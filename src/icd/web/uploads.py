"""Uploaded bytes -> an 8-bit RGB image, or `UploadError` with a message the page can show as it is.

Refused before decoding: empty files, files over `Limits.max_bytes`, non-images, images whose header claims a side
over `Limits.max_side` or more than `icd.imageio.MAX_PIXELS` pixels (decompression bombs). Refused while decoding:
corrupt or truncated files and Pillow's own decompression-bomb check.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from icd.imageio import MAX_PIXELS, to_rgb

DEFAULT_MAX_MB = 20.0
DEFAULT_MAX_SIDE = 4096


class UploadError(ValueError):
    """An upload the page refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_bytes: int = int(DEFAULT_MAX_MB * 1_000_000)
    max_side: int = DEFAULT_MAX_SIDE

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_side < 1:
            raise ValueError(f"upload limits must be positive, got {self.max_bytes} bytes / {self.max_side} px")

    @property
    def max_mb(self) -> float:
        return self.max_bytes / 1_000_000


def check_size(n_bytes: int, limits: Limits) -> None:
    if n_bytes == 0:
        raise UploadError("the uploaded file is empty")
    if n_bytes > limits.max_bytes:
        raise UploadError(f"the uploaded file is over the size limit of {limits.max_mb:g} MB", status=413)


def decode_upload(data: bytes, limits: Limits, name: str = "upload") -> Image.Image:
    """Decode `data` fully as RGB, or raise `UploadError` naming `name`."""
    check_size(len(data), limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise UploadError(f"{name}: refused as a decompression bomb ({w}x{h} pixels)", status=413)
                if max(w, h) > limits.max_side:
                    raise UploadError(f"{name}: the image is {w}x{h} pixels, over the limit of {limits.max_side} px "
                                      "a side", status=413)
                im.load()
                return to_rgb(im)
    except UploadError:
        raise
    except UnidentifiedImageError:
        raise UploadError(f"{name}: not an image (Pillow cannot identify the file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(f"{name}: refused as a decompression bomb", status=413) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UploadError(f"{name}: corrupt or truncated image ({e})") from None
