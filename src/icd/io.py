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
def atomic_directory(final: str | Path):
    """Yield a temporary sibling folder to fill; on success it replaces `final` by a rename."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
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
