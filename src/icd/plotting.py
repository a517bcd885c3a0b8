"""Image grids with captions (PIL only)."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw


def hstack(images: list[np.ndarray], gap: int = 2) -> np.ndarray:
    """Place uint8 [H,W,3] images side by side with a white gap."""
    h = max(im.shape[0] for im in images)
    parts = []
    for k, im in enumerate(images):
        parts.append(im)
        if k < len(images) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def captioned_grid(images: list[np.ndarray], captions: list[str], *, cols: int = 4, scale: int = 3,
                   text_lines: int = 3) -> np.ndarray:
    """uint8 images with a caption under each, `cols` per row, magnified `scale` times (nearest neighbour)."""
    size = images[0].shape[0] * scale
    width = max(size, 160)
    cell_h = size + 12 * text_lines + 6
    rows = (len(images) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * (width + 4), rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (im, cap) in enumerate(zip(images, captions)):
        x, y = (k % cols) * (width + 4), (k // cols) * cell_h
        canvas.paste(Image.fromarray(im).resize((size, size), Image.NEAREST), (x + (width - size) // 2, y))
        for j, line in enumerate(textwrap.wrap(cap, width=width // 6)[:text_lines]):
            draw.text((x + 2, y + size + 2 + 12 * j), line, fill=(0, 0, 0))
    return np.asarray(canvas)
