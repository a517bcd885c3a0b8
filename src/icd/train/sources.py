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

A wrong caption column, an empty dataset or a missing file is a `DataError` (one line) raised here, before any
model is loaded. Unreadable images are not: the batch reader (`icd.train.batches`) skips and counts them.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from icd.imageio import to_rgb
from icd.io import file_problem
from icd.train.config import ConfigError

FORMATS = ("auto", "world", "imagefolder", "csv", "webdataset", "hf")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class DataError(ConfigError):
    """A dataset that cannot be trained on (raised before training starts)."""


class BadImage(Exception):
    """One example whose image cannot be decoded (skipped and counted, never fatal)."""


def decode_image(data: bytes | Image.Image, what: str) -> Image.Image:
    """8-bit RGB with EXIF orientation applied, or `BadImage` naming `what`."""
    try:
        im = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
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
        value = self.dataset[int(i)][self.image_column]
        if isinstance(value, dict):  # an undecoded datasets Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or Path(value.get("path") or "").read_bytes()
        elif isinstance(value, str):
            value = Path(value).read_bytes()
        return decode_image(value, f"{self.description} row {i}")


def _caption_of(row: dict, column: str, where: str) -> str:
    if column not in row:
        raise DataError(f"{where}: no caption column {column!r} (columns: {', '.join(map(str, row)) or 'none'}); "
                        "set caption_column")
    value = row[column]
    return value if isinstance(value, str) else str(value)


def _table(rows: list[dict], base: Path, *, caption_column: str, image_column: str, where: str) -> TableSource:
    if not rows:
        raise DataError(f"{where}: the dataset is empty (no rows)")
    image_column = image_column or "file_name"
    if image_column not in rows[0]:
        raise DataError(f"{where}: no image column {image_column!r} (columns: {', '.join(rows[0])}); "
                        "set image_column")
    captions = [_caption_of(r, caption_column, f"{where} row {i + 1}") for i, r in enumerate(rows)]
    names = [str(r[image_column]) for r in rows]
    return TableSource(description=where, captions=captions, files=[base / n for n in names], keys=names)


def _read_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
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
    captions = [c if isinstance(c, str) else str(c) for c in ds[caption_column]]
    return TableSource(description=data, captions=captions, dataset=ds, image_column=image_column,
                       keys=[str(i) for i in range(len(ds))])


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
                    return str(meta[column])
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
    source.caption(first, source.samples(first)[0])  # a wrong caption column stops here
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
