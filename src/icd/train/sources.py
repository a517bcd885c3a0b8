"""Image–caption datasets in the formats people have, opened and checked before any training starts.

``open_source(data, fmt, caption_column=, image_column=)`` returns one of:

- `TableSource` (map-style, random access): an image folder with ``metadata.jsonl`` / ``metadata.csv`` (the Hugging
  Face ``imagefolder`` convention: ``file_name`` plus a caption column), a CSV file (image paths relative to it), or
  a Hugging Face ``datasets`` dataset (a ``save_to_disk`` folder, or a hub id where online);
- `ShardSource` (streaming): webdataset ``.tar`` shards, local paths or brace patterns
  (``data/shard-{000000..000127}.tar``). A sample is the members sharing a key (the name up to the first dot of
  its base name); the image is the first member with an image extension, the caption a ``.txt`` member (or the
  member whose extension is the caption column, or that field of a ``.json`` member). Only one sample's bytes are
  read at a time; member offsets come from the tar headers, so a shard is never held in memory.

A wrong caption column, an empty dataset, a row without an image name, a missing file or a dataset without one
readable image is a `DataError` (one line) raised here, before any model is loaded. Rows that cannot teach anything
are left out here and counted in one warning: a caption that is null or not text (numbers, lists), and an image of a
degenerate size (`size_problem`: shorter side below `MIN_SIDE` px, aspect above `MAX_ASPECT`, more than
`MAX_PIXELS`; a folder's or CSV's image headers are all read here, other formats' sizes when each image is read).
Unreadable images are counted here for folders and CSV; the batch reader (`icd.train.batches`) skips and counts them
as it meets them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from icd.imageio import to_rgb
from icd.io import file_problem
from icd.train.config import ConfigError

log = logging.getLogger(__name__)
FORMATS = ("auto", "world", "imagefolder", "csv", "webdataset", "hf")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MIN_SIDE = 8  # px: a shorter side below this holds no picture to crop
MAX_ASPECT = 8.0  # longer / shorter side: a 20000x1 strip resized to the training size would need gigabytes
MAX_PIXELS = 1 << 26  # 64 M pixels (PIL refuses "decompression bombs" only from 179 M)


class DataError(ConfigError):
    """A dataset that cannot be trained on (raised before training starts)."""


class BadImage(Exception):
    """One example whose image cannot be decoded (skipped and counted, never fatal)."""


def size_problem(width: int, height: int) -> str | None:
    """Why a `width` x `height` image is not trained on (a degenerate size), or None."""
    short, long = min(width, height), max(width, height)
    if short < MIN_SIDE:
        return f"{width}x{height} px, shorter side below {MIN_SIDE} px"
    if long > MAX_ASPECT * short:
        return f"{width}x{height} px, aspect ratio above {MAX_ASPECT:g}:1"
    if width * height > MAX_PIXELS:
        return f"{width}x{height} px, more than {MAX_PIXELS >> 20} M pixels"
    return None


def decode_image(data: bytes | Image.Image, what: str) -> Image.Image:
    """8-bit RGB with EXIF orientation applied, or `BadImage` naming `what` (also for a degenerate size, checked
    from the header before the pixels are decoded)."""
    try:
        im = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        problem = size_problem(*im.size)
        if problem:
            raise BadImage(f"{what}: {problem}")
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{what}: {e}") from None


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as in webdataset / bash: ``a-{000..002}.tar`` -> a-000.tar a-001.tar a-002.tar (zero padding
    kept), ``{x,y}`` -> x y; several groups expand as a product."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


# ------------------------------------------------------------------------------------------- map-style tables
@dataclass
class TableSource:
    """Random-access examples: ``image(i)`` (decoded RGB, or `BadImage`) and ``captions[i]``."""

    description: str
    captions: list[str]
    files: list[Path] | None = None  # image files (imagefolder, csv)
    dataset: object | None = None  # a `datasets.Dataset` (hf)
    rows: list[int] | None = None  # the dataset's row of each example (hf; rows with unusable captions left out)
    image_column: str = "image"
    keys: list[str] = field(default_factory=list)  # stable identities (the latent cache's keys)

    def __len__(self) -> int:
        return len(self.captions)

    def image(self, i: int) -> Image.Image:
        if self.files is not None:
            path = self.files[i]
            problem = file_problem(path)
            if problem:
                raise BadImage(f"{path}: {problem}")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise BadImage(f"{path}: {e.strerror or e}") from None
            return decode_image(data, str(path))
        value = self.dataset[int(i if self.rows is None else self.rows[i])][self.image_column]
        if isinstance(value, dict):  # an undecoded datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or Path(value.get("path") or "").read_bytes()
        elif isinstance(value, str):
            value = Path(value).read_bytes()
        return decode_image(value, f"{self.description} row {i}")


def _caption_problem(value) -> str | None:
    """Why a caption cell cannot be trained on (None: it is text)."""
    if value is None:
        return "caption is null"
    if not isinstance(value, str):
        return "caption is not text"
    return None


class _Skips:
    """Rows left out of a dataset, counted by reason and reported in one warning line."""

    def __init__(self, where: str):
        self.where, self.reasons, self.first = where, Counter(), ""

    def add(self, reason: str, detail: str) -> None:
        self.reasons[reason] += 1
        self.first = self.first or detail

    def report(self, total: int) -> None:
        n = sum(self.reasons.values())
        if n:
            why = ", ".join(f"{c} {r}" if len(self.reasons) > 1 else r for r, c in self.reasons.most_common())
            log.warning("%s: skipped %d of %d rows: %s (first: %s)", self.where, n, total, why, self.first)


def _check_image_file(path: Path) -> tuple[str, str] | None:
    """Why image file `path` cannot be trained on, from its header only: ("size", why) for a degenerate size,
    ("unreadable", why) for a missing or undecodable file; None if its header is fine."""
    problem = file_problem(path)
    if problem:
        return "unreadable", problem
    try:
        with Image.open(path) as im:
            problem = size_problem(*im.size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return "unreadable", f"not a readable image ({e})"
    return None if problem is None else ("size", problem)


def _first_readable(source, items, where: str) -> None:
    """DataError unless some example of `items` decodes (the first good one ends the search)."""
    first = ""
    for item in items:
        try:
            source.read(*item) if isinstance(item, tuple) else source.image(item)
            return
        except BadImage as e:
            first = first or str(e)
    raise DataError(f"{where}: no readable image in the data" + (f" (first: {first})" if first else ""))


def _table(rows: list[tuple[int, dict]], base: Path, *, caption_column: str, image_column: str,
           where: str) -> TableSource:
    """A folder's or CSV's rows (line number, row) as a source: every row names an image (DataError naming the line
    otherwise); rows with unusable captions or degenerately sized images are left out and counted; the image
    headers are read, and some image must decode."""
    if not rows:
        raise DataError(f"{where}: the dataset is empty (no rows)")
    image_column = image_column or "file_name"
    first_row = rows[0][1]
    if image_column not in first_row:
        raise DataError(f"{where}: no image column {image_column!r} (columns: {', '.join(map(str, first_row))}); "
                        "set image_column")
    if caption_column not in first_row:
        raise DataError(f"{where} row 1: no caption column {caption_column!r} (columns: "
                        f"{', '.join(map(str, first_row)) or 'none'}); set caption_column")
    skips, unreadable = _Skips(where), []
    captions, names = [], []
    for line, row in rows:
        name = row.get(image_column)
        if not isinstance(name, str) or not name.strip():
            what = "no" if name is None or not isinstance(name, str) else "an empty"
            raise DataError(f"{where} line {line}: {what} {image_column!r} value (the image column; got "
                            f"{json.dumps(name)})")
        problem = "no caption" if caption_column not in row else _caption_problem(row[caption_column])
        if problem:
            skips.add(problem, f"line {line}")
            continue
        issue = _check_image_file(base / name)
        if issue is not None and issue[0] == "size":  # never decoded: left out of the stream
            skips.add("image of a degenerate size", f"line {line}: {name}, {issue[1]}")
            continue
        if issue is not None:  # unreadable: kept, so the stream skips and counts it as it meets it (log.csv)
            unreadable.append(f"{name}: {issue[1]}")
        captions.append(row[caption_column])
        names.append(name)
    skips.report(len(rows))
    if not names:
        raise DataError(f"{where}: no usable row (of {len(rows)}): {', '.join(skips.reasons)}")
    source = TableSource(description=where, captions=captions, files=[base / n for n in names], keys=names)
    if len(unreadable) == len(names):
        raise DataError(f"{where}: no readable image in the data ({len(names)} rows; first: {unreadable[0]})")
    if unreadable:
        log.warning("%s: %d of %d images cannot be read and will be skipped (first: %s)", where, len(unreadable),
                    len(names), unreadable[0])
    _first_readable(source, range(len(source)), where)
    return source


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a .csv or .jsonl file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(reader.line_num, row) for row in reader]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def _hf(data: str, *, caption_column: str, image_column: str) -> TableSource:
    import datasets  # heavy and optional for world / folder training: imported only for this format

    try:
        if Path(data).is_dir():
            ds = datasets.load_from_disk(data)
        else:
            ds = datasets.load_dataset(data, split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types (offline, missing, corrupt): one line
        raise DataError(f"cannot open the Hugging Face dataset {data}: {str(e).splitlines()[0] if str(e) else e}"
                        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{data}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if len(ds) == 0:
        raise DataError(f"{data}: the dataset is empty (no rows)")
    image_column = image_column or "image"
    for column, option in ((caption_column, "caption_column"), (image_column, "image_column")):
        if column not in ds.column_names:
            raise DataError(f"{data}: no column {column!r} (columns: {', '.join(ds.column_names)}); set {option}")
    skips, captions, kept = _Skips(data), [], []
    for i, c in enumerate(ds[caption_column]):
        problem = _caption_problem(c)
        if problem:
            skips.add(problem, f"row {i}")
        else:
            captions.append(c)
            kept.append(i)
    skips.report(len(ds))
    if not kept:
        raise DataError(f"{data}: no usable row (of {len(ds)}): {', '.join(skips.reasons)}")
    source = TableSource(description=data, captions=captions, dataset=ds, image_column=image_column,
                         keys=[str(i) for i in kept], rows=kept)
    _first_readable(source, range(len(source)), data)
    return source


# ------------------------------------------------------------------------------------------- webdataset shards
@dataclass
class ShardSource:
    """Webdataset shards: ``samples(shard)`` lists a shard's sample keys from its headers; ``read(shard, key)``
    decodes one sample."""

    description: str
    shards: list[Path]
    caption_column: str = "txt"
    _index: dict = field(default_factory=dict, repr=False)  # shard -> {key: {ext: TarInfo}}

    def members(self, shard: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
        if shard not in self._index:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                with tarfile.open(shard) as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        folder, _, base = info.name.rpartition("/")
                        stem, dot, ext = base.partition(".")
                        if dot:
                            groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = info
            except (OSError, tarfile.TarError) as e:
                raise DataError(f"{shard}: not a readable tar shard ({e})") from None
            self._index = {shard: groups}  # one shard's headers at a time
        return self._index[shard]

    def samples(self, shard: Path) -> list[str]:
        return sorted(k for k, m in self.members(shard).items() if any(e in m for e in IMAGE_EXTENSIONS))

    def caption(self, shard: Path, key: str, tar: tarfile.TarFile | None = None) -> str:
        members = self.members(shard)[key]
        own = tar or tarfile.open(shard)
        try:
            column = self.caption_column
            if column in members:
                return own.extractfile(members[column]).read().decode("utf-8", "replace").strip()
            if column == "text" and "txt" in members:
                return own.extractfile(members["txt"]).read().decode("utf-8", "replace").strip()
            if "json" in members:
                meta = json.loads(own.extractfile(members["json"]).read())
                if isinstance(meta, dict) and column in meta:
                    problem = _caption_problem(meta[column])
                    if problem:  # skipped and counted like an unreadable image
                        raise BadImage(f"{shard}:{key}.json: {problem}")
                    return meta[column]
            found = ", ".join(sorted(members))
            raise DataError(f"{shard} sample {key}: no caption {column!r} (members: {found}); set caption_column")
        finally:
            if tar is None:
                own.close()

    def read(self, shard: Path, key: str) -> tuple[Image.Image, str]:
        members = self.members(shard)[key]
        ext = next(e for e in IMAGE_EXTENSIONS if e in members)
        with tarfile.open(shard) as tar:
            try:
                data = tar.extractfile(members[ext]).read()
            except (OSError, tarfile.TarError) as e:
                raise BadImage(f"{shard}:{key}.{ext}: {e}") from None
            caption = self.caption(shard, key, tar)
        return decode_image(data, f"{shard}:{key}.{ext}"), caption


def _shards(data: str, caption_column: str) -> ShardSource:
    paths = [Path(p) for part in data.split("::") for p in expand_braces(part)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"webdataset shard not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
    source = ShardSource(description=data, shards=paths, caption_column=caption_column)
    first = next((p for p in paths if source.samples(p)), None)
    if first is None:
        raise DataError(f"{data}: the shards hold no image samples")
    try:
        source.caption(first, source.samples(first)[0])  # a wrong caption column stops here
    except BadImage:
        pass  # this sample's caption is null: it is skipped; the column exists
    _first_readable(source, ((s, k) for s in paths for k in source.samples(s)), data)
    return source


# ------------------------------------------------------------------------------------------------- opening
def detect_format(data: str) -> str:
    """The format of `data` (see `FORMATS`) from its name and what is on disk."""
    if data == "world":
        return "world"
    if ".tar" in data:
        return "webdataset"
    path = Path(data)
    if path.suffix.lower() in (".csv", ".jsonl"):
        return "csv"
    if path.is_dir():
        if any((path / m).is_file() for m in METADATA_FILES):
            return "imagefolder"
        if any((path / m).is_file() for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        raise DataError(f"{data}: a folder without metadata.jsonl / metadata.csv (imagefolder) or a saved "
                        "Hugging Face dataset; see docs/training.md §1")
    if path.exists():
        raise DataError(f"{data}: not a dataset (a folder, .csv, .jsonl, .tar shards or a hub id)")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", data):
        return "hf"
    raise DataError(f"data not found: {data}")


def open_source(data: str, fmt: str = "auto", *, caption_column: str = "text", image_column: str = ""
                ) -> TableSource | ShardSource:
    """Open and check dataset `data` (see the module docstring); `DataError` in one line if it cannot be used."""
    if fmt not in FORMATS:
        raise DataError(f"data_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt == "world":
        raise DataError("the world dataset is rendered, not opened (data = 'world')")
    if fmt == "webdataset":
        return _shards(data, caption_column)
    if fmt == "hf":
        return _hf(data, caption_column=caption_column, image_column=image_column)
    path = Path(data)
    if fmt == "imagefolder":
        meta = next((path / m for m in METADATA_FILES if (path / m).is_file()), None)
        if meta is None:
            raise DataError(f"{data}: no metadata.jsonl or metadata.csv (file_name + caption per image)")
        return _table(_read_rows(meta), path, caption_column=caption_column, image_column=image_column,
                      where=str(meta))
    if not path.is_file():
        raise DataError(f"data file not found: {data}")
    return _table(_read_rows(path), path.parent, caption_column=caption_column, image_column=image_column,
                  where=str(path))
