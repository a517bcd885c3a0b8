"""PIE-Bench loader: read the public prompt-based image editing benchmark as `BenchCase` objects.

PIE-Bench is the editing benchmark released with "PnP Inversion: Boosting Diffusion-based Editing with 3 Lines of
Code" (Ju et al., 2023; data release ``PIE-Bench_v1``). The release is a folder::

    PIE-Bench_v1/
        mapping_file.json
        annotation_images/
            0_random_140/000000000000.jpg
            1_change_object_80/...
            ...

``mapping_file.json`` is a JSON object keyed by a 12-digit id string. Each value is an object with

=====================  =================================================================================
key                    meaning
=====================  =================================================================================
``image_path``         the source image, relative to ``annotation_images/``
``original_prompt``    caption of the source image, edited words in square brackets: ``a [cat] on grass``
``editing_prompt``     caption of the wanted result, edited words in square brackets: ``a [dog] on grass``
``editing_instruction`` the edit as a sentence (unused here)
``editing_type_id``    a string "0".."9", see `EDITING_TYPES`
``blended_word``       "source_word target_word" for Prompt-to-Prompt local blending, or ""
``mask``               run-length encoded edit region: flat pairs (start, length), see `decode_mask`
=====================  =================================================================================

Images are 512 x 512 in the release. The mask is decoded on the image grid (row-major, 0-based starts); the public
evaluation code then sets the outermost rows and columns to 1 "to avoid annotation errors in boundary", which
`decode_mask` reproduces with ``border=True`` (the default).

Prompts handed to a model have the brackets removed (the bracketed words are kept); `bracketed_words` recovers the
marked spans. `write_fixture` writes a small dataset in the same layout from shapes-world edit cases
(`icd.world.make_case`), so the loader can be tested end to end against exact ground truth.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from icd import world
from icd.bench.cases import KIND_STRIDE, BenchCase
from icd.imageio import ImageError, load_image

MAPPING_FILE = "mapping_file.json"
IMAGES_DIR = "annotation_images"

# editing_type_id -> short kind name (PIE-Bench's ten editing types)
EDITING_TYPES: dict[str, str] = {
    "0": "random",
    "1": "change_object",
    "2": "add_object",
    "3": "delete_object",
    "4": "change_content",  # change attribute (content)
    "5": "change_pose",  # change attribute (pose)
    "6": "change_color",  # change attribute (color)
    "7": "change_material",  # change attribute (material)
    "8": "change_background",
    "9": "change_style",
}
KIND_NAMES: tuple[str, ...] = tuple(EDITING_TYPES.values())

# shapes-world edit kind -> PIE-Bench editing_type_id used by `write_fixture`. A size edit is a non-rigid change of
# an object's attribute, filed under "change attribute (content)".
WORLD_KIND_TO_TYPE: dict[str, str] = {"color": "6", "shape": "1", "background": "8", "size": "4"}

# editing_instruction templates of `write_fixture`, by world kind
_INSTRUCTIONS: dict[str, str] = {
    "color": "Make the {old} object {new}.",
    "shape": "Turn the {old} into a {new}.",
    "background": "Change the {old} background to {new}.",
    "size": "Make the {old} object {new}.",
}

REQUIRED_KEYS: tuple[str, ...] = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")
OPTIONAL_KEYS: tuple[str, ...] = ("editing_instruction", "blended_word")  # default "" when absent

_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


class PieBenchError(ValueError):
    """A PIE-Bench folder, entry or mask that cannot be read; the message names the file or entry."""


# ----------------------------------------------------------------------------------------------- masks


def _as_int(value: object, where: str) -> int:
    """An RLE element as a Python int (ints and integral floats; bools are refused)."""
    if isinstance(value, (bool, np.bool_)):
        raise PieBenchError(f"mask RLE {where} is a boolean, expected an integer")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise PieBenchError(f"mask RLE {where} is {value!r}, expected an integer")


def decode_mask(rle: Sequence[int], height: int, width: int, border: bool = True) -> np.ndarray:
    """Run-length encoded mask -> bool [height, width].

    `rle` is a flat list of pairs (start, length) over the row-major flattened image: each pair marks `length`
    pixels from index `start` (0-based). A run that would pass the end is clipped. With `border` (the default, as
    in the public PIE-Bench evaluation) the first and last rows and columns are set True. Raises `PieBenchError`
    for an odd-length list, a non-integer, a negative length or a start outside the image.
    """
    if height <= 0 or width <= 0:
        raise PieBenchError(f"mask size must be positive, got {height}x{width}")
    if isinstance(rle, (str, bytes)) or not isinstance(rle, (Sequence, np.ndarray)):
        raise PieBenchError(f"mask RLE must be a list of integers, got {type(rle).__name__}")
    if len(rle) % 2:
        raise PieBenchError(f"mask RLE must hold (start, length) pairs, got an odd number of values ({len(rle)})")
    n = height * width
    edges = np.zeros(n + 1, dtype=np.int64)  # +1 where a run starts, -1 where it ends; cumsum > 0 inside runs
    for k in range(0, len(rle), 2):
        start, length = _as_int(rle[k], f"value {k}"), _as_int(rle[k + 1], f"value {k + 1}")
        if not 0 <= start < n:
            raise PieBenchError(f"mask RLE start {start} (value {k}) is outside 0..{n - 1} "
                                f"for a {height}x{width} image")
        if length < 0:
            raise PieBenchError(f"mask RLE length {length} (value {k + 1}) is negative")
        edges[start] += 1
        edges[min(start + length, n)] -= 1
    mask = (np.cumsum(edges[:n]) > 0).reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """bool [H, W] -> flat list of (start, length) pairs, one per run of True in row-major order.

    The inverse of ``decode_mask(..., border=False)``. Border handling is not inverted: decoding with
    ``border=True`` returns the mask with its outermost rows and columns set, whatever was encoded.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise PieBenchError(f"mask must be 2-D [H, W], got shape {arr.shape}")
    flat = np.concatenate([[False], arr.astype(bool).ravel(), [False]])
    changes = np.flatnonzero(flat[1:] != flat[:-1])  # alternating run starts and ends
    starts, ends = changes[0::2], changes[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


# ----------------------------------------------------------------------------------------------- prompts


def bracketed_words(prompt: str) -> list[str]:
    """The spans marked with square brackets in `prompt`, in order (a span may hold several words)."""
    return [" ".join(m.split()) for m in _BRACKETED.findall(prompt)]


def strip_brackets(prompt: str) -> str:
    """`prompt` without square brackets (the words inside are kept), whitespace collapsed."""
    return " ".join(prompt.replace("[", " ").replace("]", " ").split())


def _blend_words(blended_word: str) -> tuple[str, str] | None:
    """``"cat dog"`` -> ``("cat", "dog")``; anything but exactly two words -> None."""
    words = blended_word.split()
    return (words[0], words[1]) if len(words) == 2 else None


# ----------------------------------------------------------------------------------------------- loading


def _read_mapping(root: Path) -> dict[str, dict]:
    """Check the folder layout and parse ``mapping_file.json`` (a JSON object of objects)."""
    if not root.exists():
        raise PieBenchError(f"PIE-Bench folder not found: {root}")
    if not root.is_dir():
        raise PieBenchError(f"PIE-Bench path is not a folder: {root}")
    mapping_path = root / MAPPING_FILE
    if not mapping_path.is_file():
        raise PieBenchError(f"missing {MAPPING_FILE} in PIE-Bench folder {root}")
    if not (root / IMAGES_DIR).is_dir():
        raise PieBenchError(f"missing {IMAGES_DIR}/ in PIE-Bench folder {root}")
    try:
        mapping = json.loads(mapping_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PieBenchError(f"{mapping_path} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise PieBenchError(f"{mapping_path} is not valid JSON: {e}") from None
    if not isinstance(mapping, dict):
        raise PieBenchError(f"{mapping_path} must hold a JSON object keyed by id, got {type(mapping).__name__}")
    for case_id, entry in mapping.items():
        _check_entry(mapping_path, case_id, entry)
    return mapping


def _check_entry(mapping_path: Path, case_id: str, entry: object) -> None:
    """Validate the keys and value types of one mapping entry (images and masks are checked when loaded)."""
    where = f"{mapping_path}: entry {case_id!r}"
    if not isinstance(entry, dict):
        raise PieBenchError(f"{where} must be a JSON object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise PieBenchError(f"{where} lacks key(s) {', '.join(missing)}")
    for key in ("image_path", "original_prompt", "editing_prompt", *OPTIONAL_KEYS):
        if key in entry and not isinstance(entry[key], str):
            raise PieBenchError(f"{where}: {key} must be a string, got {type(entry[key]).__name__}")
    if str(entry["editing_type_id"]) not in EDITING_TYPES or isinstance(entry["editing_type_id"], bool):
        raise PieBenchError(f"{where}: editing_type_id {entry['editing_type_id']!r} is not one of "
                            f"{', '.join(EDITING_TYPES)}")
    if not isinstance(entry["mask"], list):
        raise PieBenchError(f"{where}: mask must be a list of integers, got {type(entry['mask']).__name__}")


def _check_kinds(kinds: Iterable[str] | str | None) -> set[str] | None:
    """Normalise the `kinds` filter; unknown names raise `PieBenchError` listing the valid ones."""
    if kinds is None:
        return None
    wanted = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = sorted(wanted - set(KIND_NAMES))
    if unknown:
        raise PieBenchError(f"unknown PIE-Bench kind(s) {', '.join(unknown)}; choose from {', '.join(KIND_NAMES)}")
    return wanted


def _image_file(root: Path, case_id: str, rel: str) -> Path:
    """The image file of an entry: it must exist and lie inside ``annotation_images/``."""
    images = (root / IMAGES_DIR).resolve()
    path = (images / rel).resolve()
    if images not in path.parents:
        raise PieBenchError(f"{root / MAPPING_FILE}: entry {case_id!r}: image_path {rel!r} leaves {IMAGES_DIR}/")
    if not path.is_file():
        raise PieBenchError(f"{root / MAPPING_FILE}: entry {case_id!r}: image not found: {root / IMAGES_DIR / rel}")
    return path


def _load_case(root: Path, case_id: str, entry: dict, *, image_size: int | None, border: bool) -> BenchCase:
    """Read the image and mask of one (validated) entry and build its `BenchCase`."""
    path = _image_file(root, case_id, entry["image_path"])
    try:
        image = load_image(path)
    except ImageError as e:
        raise PieBenchError(f"entry {case_id!r}: {e}") from None
    try:
        mask = decode_mask(entry["mask"], image.height, image.width, border=border)
    except PieBenchError as e:
        raise PieBenchError(f"{root / MAPPING_FILE}: entry {case_id!r}: {e}") from None
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
        mask_im = Image.fromarray(mask.astype(np.uint8) * 255).resize((image_size, image_size), Image.NEAREST)
        mask = np.asarray(mask_im) > 127
    return BenchCase(
        case_id=case_id,
        kind=EDITING_TYPES[str(entry["editing_type_id"])],
        source=np.ascontiguousarray(np.asarray(image, dtype=np.uint8)),
        source_prompt=strip_brackets(entry["original_prompt"]),
        target_prompt=strip_brackets(entry["editing_prompt"]),
        mask=mask,
        target=None,
        blend_words=_blend_words(entry.get("blended_word", "")),
    )


def load_pie_bench(root: str | Path, *, limit: int | None = None, kinds: Iterable[str] | str | None = None,
                   image_size: int | None = None, border: bool = True) -> list[BenchCase]:
    """The cases of the PIE-Bench folder `root`, sorted by id.

    `kinds` keeps only the named editing types (names of `KIND_NAMES`); `limit` then keeps the first `limit`
    cases. Every entry of the mapping file is validated; images and masks are read for the kept cases only.
    `image_size` resizes the image (bilinear) and mask (nearest) to a square; `border` is passed to
    `decode_mask`. Raises `PieBenchError` with a one-line message naming the file or entry.
    """
    if limit is not None and limit < 0:
        raise PieBenchError(f"limit must be >= 0, got {limit}")
    if image_size is not None and image_size <= 0:
        raise PieBenchError(f"image_size must be positive, got {image_size}")
    wanted = _check_kinds(kinds)
    root = Path(root)
    mapping = _read_mapping(root)
    ids = sorted(mapping)
    if wanted is not None:
        ids = [i for i in ids if EDITING_TYPES[str(mapping[i]["editing_type_id"])] in wanted]
    if limit is not None:
        ids = ids[:limit]
    return [_load_case(root, i, mapping[i], image_size=image_size, border=border) for i in ids]


# ----------------------------------------------------------------------------------------------- fixture


def fixture_cases(n_per_kind: int = 2, seed_start: int = world.EVAL_SEED_START + 700_000) -> list[world.EditCase]:
    """`n_per_kind` world edit cases of each kind in `world.EDIT_KINDS`, kind-major.

    Kind ``j`` tries seeds ``seed_start + KIND_STRIDE * j + i`` for i = 0, 1, ... and skips a seed whose case
    `world.make_case` cannot build (it raises ValueError, e.g. a size edit of an object whose twin of the other size
    is already in the scene).
    """
    if not 0 < n_per_kind <= KIND_STRIDE:
        raise PieBenchError(f"n_per_kind must lie in 1..{KIND_STRIDE}, got {n_per_kind}")
    cases: list[world.EditCase] = []
    for j, kind in enumerate(world.EDIT_KINDS):
        found = 0
        for i in range(KIND_STRIDE):
            try:
                cases.append(world.make_case(kind, seed_start + KIND_STRIDE * j + i))
            except ValueError:
                continue
            found += 1
            if found == n_per_kind:
                break
        if found < n_per_kind:
            raise PieBenchError(f"only {found} of {n_per_kind} {kind} cases could be built from {KIND_STRIDE} seeds")
    return cases


def fixture_ids(cases: Sequence[world.EditCase]) -> list[str]:
    """The 12-digit ids `write_fixture` gives `cases`: the editing type digit, then the index within that type."""
    counts: dict[str, int] = {}
    ids = []
    for case in cases:
        type_id = _world_type(case.kind)
        ids.append(f"{type_id}{counts.get(type_id, 0):011d}")
        counts[type_id] = counts.get(type_id, 0) + 1
    return ids


def _world_type(kind: str) -> str:
    """The PIE-Bench editing_type_id of a world edit kind."""
    if kind not in WORLD_KIND_TO_TYPE:
        known = ", ".join(WORLD_KIND_TO_TYPE)
        raise PieBenchError(f"no PIE-Bench editing type for world kind {kind!r}; known: {known}")
    return WORLD_KIND_TO_TYPE[kind]


def _bracket_prompts(case: world.EditCase) -> tuple[str, str]:
    """Source and target prompts with the changed word in square brackets.

    The changed word is found where the two prompts differ word by word (world edits change one word in place);
    failing that, the first occurrence of each blend word is bracketed.
    """
    src, tgt = case.source_prompt.split(), case.target_prompt.split()
    if len(src) == len(tgt):
        diff = [k for k, (a, b) in enumerate(zip(src, tgt)) if a != b]
        if len(diff) == 1:
            k = diff[0]
            src[k], tgt[k] = f"[{src[k]}]", f"[{tgt[k]}]"
            return " ".join(src), " ".join(tgt)
    for words, word in ((src, case.blend_words[0]), (tgt, case.blend_words[1])):
        if word in words:
            k = words.index(word)
            words[k] = f"[{word}]"
    return " ".join(src), " ".join(tgt)


def _fixture_entry(case: world.EditCase, type_id: str, image_rel: str) -> dict:
    """The mapping-file entry of one world case."""
    old, new = case.blend_words
    source_prompt, target_prompt = _bracket_prompts(case)
    return {
        "image_path": image_rel,
        "original_prompt": source_prompt,
        "editing_prompt": target_prompt,
        "editing_instruction": _INSTRUCTIONS[case.kind].format(old=old, new=new),
        "editing_type_id": type_id,
        "blended_word": f"{old} {new}",
        "mask": encode_mask(case.mask),
    }


def _check_fixture_target(root: Path) -> None:
    """Refuse a file, or a folder that is not empty, at the fixture's destination."""
    if root.exists() and not root.is_dir():
        raise PieBenchError(f"fixture destination is a file: {root}")
    if root.is_dir() and any(root.iterdir()):
        raise PieBenchError(f"refusing to overwrite the non-empty folder {root}")


def write_fixture(root: str | Path, cases: Sequence[world.EditCase] | None = None, *, n_per_kind: int = 2,
                  seed_start: int = world.EVAL_SEED_START + 700_000) -> Path:
    """Write a small PIE-Bench-layout dataset of world edit cases to `root` and return `root`.

    `cases` defaults to ``fixture_cases(n_per_kind, seed_start)``. World kinds map to editing types by
    `WORLD_KIND_TO_TYPE`; ids come from `fixture_ids`. Images are PNG (lossless) under
    ``annotation_images/<type id>_<kind name>/<id>.png``; prompts bracket the changed word; ``blended_word`` is
    ``"old new"``; the mask is `encode_mask` of the case mask (no border).
    Everything is written to a temporary folder beside `root`, then renamed into place. Refuses (`PieBenchError`)
    a destination that is a file or a non-empty folder.
    """
    root = Path(root)
    _check_fixture_target(root)
    if cases is None:
        cases = fixture_cases(n_per_kind, seed_start)
    ids = fixture_ids(cases)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        mapping = {}
        for case_id, case in zip(ids, cases):
            type_id = WORLD_KIND_TO_TYPE[case.kind]
            rel = f"{type_id}_{EDITING_TYPES[type_id]}/{case_id}.png"
            (tmp / IMAGES_DIR / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(case.source, dtype=np.uint8)).save(tmp / IMAGES_DIR / rel, format="PNG")
            mapping[case_id] = _fixture_entry(case, type_id, rel)
        (tmp / IMAGES_DIR).mkdir(exist_ok=True)
        (tmp / MAPPING_FILE).write_text(json.dumps(mapping, indent=1), encoding="utf-8")
        _check_fixture_target(root)  # nothing appeared meanwhile
        if root.is_dir():
            root.rmdir()
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
