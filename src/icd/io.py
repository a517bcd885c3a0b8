"""Files written atomically: a temporary sibling is filled, flushed and renamed into place, so a crash or a full
disk never leaves a half-written file (or folder) under the final name."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a folder (its entries) where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(final: str | Path, *, from_current: bool = False):
    """Yield a temporary sibling folder to fill; on success it replaces `final` by a rename. With `from_current`
    the folder starts as a copy of `final` (where it exists), for an update of some of its parts. An exception in
    the block (a size check, an interrupt) removes the temporary folder and leaves `final` as it was."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if from_current and final.is_dir():
        shutil.copytree(final, tmp)
    else:
        tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def disk_mb(path: str | Path) -> float:
    """Size on disk of a file, or of every file under a folder, in MB (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a regular file, without opening it (a FIFO would block a reader): "not found",
    "a symbolic link loop", "a directory, not a file", "not a regular file (a FIFO, socket or device)"; None if
    it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "not found"
        return e.strerror or type(e).__name__
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a FIFO, socket or device)"
    return None


def folder_problem(folder: str | Path) -> str | None:
    """Why files could not be written into `folder` (created with its parents if missing), or None.

    The nearest existing ancestor must be a folder this process may create entries in; that is probed with an
    unnamed temporary file (O_TMPFILE where Linux has it), because `os.access` trusts permission bits that root,
    sysfs and read-only mounts ignore. Nothing is left behind.
    """
    folder = Path(folder)
    for q in (folder, *folder.parents):
        try:
            st = os.stat(q)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{q} is a symbolic link loop"
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                continue  # created later (or a parent is a file: found further up)
            return f"cannot write to {q} ({e.strerror})"
        if not stat.S_ISDIR(st.st_mode):
            return f"{q} is not a folder"
        try:
            with tempfile.TemporaryFile(dir=q):
                pass
        except OSError as e:
            return f"cannot write to {q} ({e.strerror or e})"
        return None
    return None


# A temporary sibling's name adds at most this many bytes to the final name (".tmp", "-<pid>", a leading dot), so a
# name is checked with this room left: a run must not end in "File name too long" after its compute.
TMP_NAME_ROOM = 16
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, used where os.pathconf cannot tell


def _limit(folder: Path, name: str, fallback: int) -> int:
    """os.pathconf(`folder`'s nearest existing ancestor, `name`), else `fallback`."""
    for q in (folder, *folder.parents):
        try:
            return os.pathconf(q, name)
        except (OSError, ValueError):
            continue
    return fallback


def name_problem(path: str | Path) -> str | None:
    """Why `path` is too long to be written on its filesystem, without touching it: a component longer than the
    folder's NAME_MAX bytes (less `TMP_NAME_ROOM` for the temporary sibling of the last one), or the whole path
    (made absolute) longer than PATH_MAX bytes. None when it fits."""
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    name_max = _limit(absolute.parent, "PC_NAME_MAX", NAME_MAX)
    for i, part in enumerate(absolute.parts[1:]):
        room = TMP_NAME_ROOM if i == len(absolute.parts) - 2 else 0
        size = len(os.fsencode(part))
        if size + room > name_max:
            name = shown(part, 40)
            if room:
                return (f"the name {name!r} is {size} bytes long; a file name takes at most {name_max - room} here "
                        f"({name_max} bytes less {room} for the temporary file)")
            return f"the folder name {name!r} is {size} bytes long, over the {name_max} bytes a name may have"
    path_max = _limit(absolute.parent, "PC_PATH_MAX", PATH_MAX)
    size = len(os.fsencode(str(absolute))) + TMP_NAME_ROOM
    if size > path_max:
        return f"the path is {size - TMP_NAME_ROOM} bytes long; a path takes at most {path_max - TMP_NAME_ROOM} here"
    return None


def output_problem(path: str | Path) -> str | None:
    """Why `path` cannot be (over)written as a regular file, even with --force: too long (`name_problem`), or an
    existing directory, device node, FIFO or socket, which a write by rename would replace (and a device node must
    never be). A symbolic link is judged by what it points at. None when it can."""
    problem = name_problem(path)
    if problem:
        return problem
    try:
        st = os.stat(path)
    except OSError:
        return None  # missing (or a dangling link / loop: the callers' own checks name those)
    if stat.S_ISDIR(st.st_mode):
        return "a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        kind = ("character device" if stat.S_ISCHR(st.st_mode) else "block device" if stat.S_ISBLK(st.st_mode)
                else "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "special file")
        return f"an existing {kind}, not a regular file: never replaced, even with --force"
    return None


def shown(path: str | Path, limit: int = 120) -> str:
    """`path` for a one-line message: one over `limit` characters shortened in the middle."""
    text = str(path)
    return text if len(text) <= limit else text[: limit // 2] + "…" + text[-(limit // 3):]


PAIR_SUFFIXES = (".json", ".safetensors")


def pair_paths(path: str | Path) -> tuple[Path, Path]:
    """The (JSON, safetensors) files of a record saved as a pair under the name `path` (a saved inversion): a
    trailing ``.json`` or ``.safetensors`` (lower case) is dropped and the two suffixes are appended to the rest,
    which is kept whole, dots included: ``run.v1`` -> ``run.v1.json`` + ``run.v1.safetensors``, ``inv.json`` ->
    ``inv.json`` + ``inv.safetensors``."""
    path = Path(path)
    name = path.name
    for suffix in PAIR_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".json"), path.with_name(name + ".safetensors")


def read_json(path: str | Path):
    """The JSON value of a UTF-8 file; ValueError with a short reason ("not UTF-8 text (byte N)", "not JSON (...)")
    that callers prefix with the file and raise as their own error class. OSError passes through."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file` through a temporary file and a rename."""
    from safetensors.torch import save_file  # a torch-side dependency; this module stays importable without it

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path
