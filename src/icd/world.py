"""The "shapes" world: procedural captioned scenes with pixel-exact edit ground truth.

Every scene is a pure function of an integer seed. A scene holds 1-3 objects (a shape in a colour and a size, at a
position) on a flat background, and renders to an RGB image with anti-aliased edges (4x4 supersampling). Its caption
follows a tiny grammar::

    a large red circle and a small blue star on a gray background

Objects are listed left to right. Objects never overlap, and every object keeps room to grow to the large size, so
a ``size`` edit of any object is always renderable.

Edit cases (`make_case`) change one word of the caption and render the exact answer:

=========== ============================== =========================================================
kind        what changes                   mask (pixels the edit may change)
=========== ============================== =========================================================
color       one object's colour word       exactly the pixels that differ (the object's support)
shape       one object's shape word        exactly the pixels that differ
background  the background colour word     exactly the pixels that differ (everything not fully covered)
size        one object's size word         union of the object's supports in source and target (non-rigid)
=========== ============================== =========================================================
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 40, 190),
    "orange": (250, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "brown": (110, 70, 40),
}
SIZES: dict[str, float] = {"small": 7.0, "large": 12.0}  # object radius in pixels at 64 px resolution
GRAMMAR_WORDS: tuple[str, ...] = ("a", "and", "on", "background")
EditKind = Literal["color", "shape", "background", "size"]
EDIT_KINDS: tuple[str, ...] = ("color", "shape", "background", "size")

BASE_RES = 64  # geometry constants above are in pixels of a 64 x 64 image
MARGIN = SIZES["large"] + 2.0  # a centre stays this far from the border (room to grow)
MIN_DIST = 2 * SIZES["large"] + 3.0  # centres of two objects stay this far apart (room to grow)
SUPERSAMPLE = 4
EVAL_SEED_START = 1_000_000_000  # seeds >= this are never used for training (held-out evaluation)


def vocabulary() -> list[str]:
    """Every word a caption of this world can contain, in a fixed order."""
    return [*GRAMMAR_WORDS, *SIZES, *COLORS, *SHAPES, *BACKGROUNDS]


@dataclass(frozen=True)
class WorldObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, pixels at 64 px resolution
    cy: float

    @property
    def words(self) -> tuple[str, str, str]:
        return (self.size, self.color, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str

    @property
    def caption(self) -> str:
        return caption_of(self.background, [o.words for o in sorted(self.objects, key=lambda o: o.cx)])

    @property
    def attributes(self) -> SceneAttributes:
        return SceneAttributes(self.background, tuple(sorted(o.words for o in self.objects)))


@dataclass(frozen=True)
class SceneAttributes:
    """What a caption says about a scene: the background and the sorted (size, colour, shape) triples."""

    background: str
    objects: tuple[tuple[str, str, str], ...]


def caption_of(background: str, objects: Sequence[tuple[str, str, str]]) -> str:
    parts = " and ".join(f"a {s} {c} {sh}" for s, c, sh in objects)
    return f"{parts} on a {background} background"


class CaptionError(ValueError):
    """A caption that is not a sentence of the world's grammar."""


def parse_caption(text: str) -> SceneAttributes:
    """Inverse of the caption grammar. Raises `CaptionError` naming the first problem."""
    words = text.lower().split()
    unknown = unknown_words(text)
    if unknown:
        raise CaptionError(unknown_words_message(unknown))
    if len(words) < 8 or words[-4:-1] != ["on", "a", words[-2]] or words[-1] != "background":
        raise CaptionError(f"caption must end with 'on a <colour> background': {text!r}")
    background = words[-2]
    if background not in BACKGROUNDS:
        raise CaptionError(f"unknown background {background!r}; choose from {', '.join(BACKGROUNDS)}")
    body, objects = words[:-4], []
    while body:
        if len(body) < 4 or body[0] != "a":
            raise CaptionError(f"expected 'a <size> <colour> <shape>' in {text!r}")
        size, color, shape = body[1:4]
        if size not in SIZES or color not in COLORS or shape not in SHAPES:
            raise CaptionError(f"expected 'a <size> <colour> <shape>', got {' '.join(body[:4])!r}")
        objects.append((size, color, shape))
        body = body[4:]
        if body:
            if body[0] != "and":
                raise CaptionError(f"objects must be joined by 'and' in {text!r}")
            body = body[1:]
    if not objects:
        raise CaptionError(f"caption names no object: {text!r}")
    return SceneAttributes(background, tuple(sorted(objects)))


def unknown_words(text: str) -> list[str]:
    known = set(vocabulary())
    return [w for w in text.lower().split() if w not in known]


def unknown_words_message(unknown: Sequence[str]) -> str:
    hints = []
    for w in unknown:
        close = difflib.get_close_matches(w, vocabulary(), n=3, cutoff=0.5)
        hints.append(f"{w!r} (did you mean {' / '.join(close)}?)" if close else repr(w))
    return f"unknown word(s) for the embedded model: {', '.join(hints)}; known words: {' '.join(vocabulary())}"


# ----------------------------------------------------------------------------------------------- sampling


def sample_scene(seed: int, *, n_objects: int | None = None, max_objects: int = 2) -> Scene:
    """The scene of `seed`. `n_objects` defaults to a seed-determined count in 1..max_objects."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_objects + 1)) if n_objects is None else n_objects
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1, 2 or 3, got {n}")
    while True:  # rejection sampling of whole layouts: a bad first position must not block the others
        centres = rng.uniform(MARGIN, BASE_RES - MARGIN, size=(n, 2))
        dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(n) * BASE_RES
        if dist.min() >= MIN_DIST:
            break
    objects: list[WorldObject] = []
    while len(objects) < n:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        if (size, color, shape) in {o.words for o in objects}:
            continue
        cx, cy = centres[len(objects)]
        objects.append(WorldObject(shape, color, size, float(cx), float(cy)))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(tuple(objects), background)


# ----------------------------------------------------------------------------------------------- rendering


def _polygon_mask(px: np.ndarray, py: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test on grids `px`, `py` for vertices (vx, vy)."""
    inside = np.zeros(px.shape, dtype=bool)
    for i in range(len(vx)):
        x1, y1, x2, y2 = vx[i], vy[i], vx[i - 1], vy[i - 1]
        crosses = (y1 > py) != (y2 > py)
        x_at = (x2 - x1) * (py - y1) / (y2 - y1 + 1e-12) + x1
        inside ^= crosses & (px < x_at)
    return inside


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside test in centred coordinates (y down) for a shape of radius `r`."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "cross":
        arm, half = 0.36 * r, 1.0 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    if shape == "triangle":
        ang = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        return _polygon_mask(dx, dy + 0.15 * r, 1.1 * r * np.cos(ang), 1.1 * r * np.sin(ang))
    if shape == "star":
        ang = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.1 * r, 0.45 * r)
        return _polygon_mask(dx, dy, rad * np.cos(ang), rad * np.sin(ang))
    raise ValueError(f"unknown shape {shape!r}")


def coverage(obj: WorldObject, res: int = BASE_RES) -> np.ndarray:
    """Fraction of each pixel covered by `obj`, float64 [res, res], by 4x4 supersampling.

    Only the object's bounding box (radius 1.4 r) is sampled; every shape fits inside it.
    """
    scale = res / BASE_RES
    r, cx, cy = SIZES[obj.size] * scale, obj.cx * scale, obj.cy * scale
    x0, x1 = max(int(np.floor(cx - 1.4 * r)), 0), min(int(np.ceil(cx + 1.4 * r)) + 1, res)
    y0, y1 = max(int(np.floor(cy - 1.4 * r)), 0), min(int(np.ceil(cy + 1.4 * r)) + 1, res)
    xs = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres in pixel units
    ys = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    px, py = np.meshgrid(xs, ys)
    inside = _shape_mask(obj.shape, px - cx, py - cy, r)
    out = np.zeros((res, res))
    out[y0:y1, x0:x1] = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    return out


def render_float(scene: Scene, res: int = BASE_RES) -> np.ndarray:
    """Unquantised render, float64 [res, res, 3] in 0..255."""
    img = np.empty((res, res, 3))
    img[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        cov = coverage(obj, res)[..., None]
        img = img * (1.0 - cov) + np.asarray(COLORS[obj.color], dtype=np.float64) * cov
    return img


def render(scene: Scene, res: int = BASE_RES) -> np.ndarray:
    """The scene as uint8 RGB [res, res, 3]."""
    return np.clip(np.rint(render_float(scene, res)), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- edit cases


@dataclass(frozen=True)
class EditCase:
    kind: str
    seed: int
    source_scene: Scene
    target_scene: Scene
    source: np.ndarray  # uint8 [H, W, 3]
    target: np.ndarray  # uint8 [H, W, 3], the exactly rendered answer
    mask: np.ndarray  # bool [H, W], True where the edit may change pixels
    source_prompt: str
    target_prompt: str
    blend_words: tuple[str, str]  # (changed word in the source prompt, changed word in the target prompt)

    def metadata(self) -> dict:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "source_prompt": self.source_prompt,
            "target_prompt": self.target_prompt,
            "blend_words": list(self.blend_words),
        }


class NoEditError(ValueError):
    """A scene admits no edit of the asked kind (e.g. two objects that differ only in size: no size edit)."""


def make_case(kind: str, seed: int, *, res: int = BASE_RES, max_objects: int = 2) -> EditCase:
    """The edit case of `kind` for `seed`: one word of the caption changes, and the answer is rendered exactly."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; choose from {', '.join(EDIT_KINDS)}")
    scene = sample_scene(seed, max_objects=max_objects)
    rng = np.random.default_rng([seed, EDIT_KINDS.index(kind)])
    first = int(rng.integers(len(scene.objects)))
    # the drawn object first; another one when the drawn object has no valid new value (two objects that differ
    # only in `kind` leave no size / colour / shape that keeps the target's objects distinct)
    for i in [first, *(j for j in range(len(scene.objects)) if j != first)]:
        obj = scene.objects[i]
        taken = {o.words for j, o in enumerate(scene.objects) if j != i}
        if kind == "background":
            valid = [v for v in BACKGROUNDS if v != scene.background]
        else:
            valid = [v for v in {"color": COLORS, "shape": SHAPES, "size": SIZES}[kind] if v != getattr(obj, kind)
                     and dataclasses.replace(obj, **{kind: v}).words not in taken]
        if valid:
            break
    else:
        raise NoEditError(f"the scene of seed {seed} has no {kind} edit that keeps its objects distinct")
    new = valid[int(rng.integers(len(valid)))]
    if kind == "background":
        old = scene.background
        target = dataclasses.replace(scene, background=new)
    else:
        old = getattr(obj, kind)
        objects = list(scene.objects)
        objects[i] = dataclasses.replace(obj, **{kind: new})
        target = dataclasses.replace(scene, objects=tuple(objects))

    src_f, tgt_f = render_float(scene, res), render_float(target, res)
    if kind == "size":
        mask = (coverage(obj, res) > 0) | (coverage(target.objects[i], res) > 0)
    else:
        mask = np.any(src_f != tgt_f, axis=-1)
    return EditCase(
        kind=kind,
        seed=seed,
        source_scene=scene,
        target_scene=target,
        source=render(scene, res),
        target=render(target, res),
        mask=mask,
        source_prompt=scene.caption,
        target_prompt=target.caption,
        blend_words=(old, new),
    )


# ----------------------------------------------------------------------------------------------- datasets


def render_dataset(seeds: Sequence[int], *, res: int = BASE_RES, max_objects: int = 2
                   ) -> tuple[np.ndarray, list[Scene]]:
    """Render many scenes: uint8 [N, res, res, 3] and the scenes."""
    scenes = [sample_scene(int(s), max_objects=max_objects) for s in seeds]
    images = np.stack([render(s, res) for s in scenes])
    return images, scenes
