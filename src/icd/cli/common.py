"""What every command module shares: CLIError, the user-error classes and their one-line report, argument helpers."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys

from icd.editing.tokens import AlignmentError
from icd.imageio import ImageError
from icd.models.base import PromptError
from icd.models.embedded import ModelError
from icd.solver import NumericsError
from icd.train.checkpoint import CheckpointError
from icd.train.config import ConfigError
from icd.world import CaptionError


class CLIError(Exception):
    """An ordinary user mistake: reported in one line, exit code 2."""


# Raised by the library for bad inputs (not bugs): `main` reports them in one line and exits with code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CLIError, ImageError, PromptError, ModelError, ConfigError, CaptionError, AlignmentError, NumericsError,
    CheckpointError, FileNotFoundError)


def print_error(e: BaseException) -> None:
    """`icd: error: <the message's first line>` on stderr."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"icd: error: {msg}", file=sys.stderr)


def default(cls, name: str):
    """The default of dataclass `cls`'s field `name`, so options follow the library's defaults."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


@contextlib.contextmanager
def library_errors():
    """Report the library's range checks (ValueError) for the user's options as one-line CLI errors."""
    try:
        yield
    except ValueError as e:
        raise CLIError(str(e)) from e


MAX_THREADS = 1024
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed takes


def _integer_in(text: str, low: int, high: int, shown: str) -> int:
    """An argparse type: the integer `text` within [low, high] (`shown` names the range in the message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must lie in {shown}, got {value}")
    return value


def _threads(text: str) -> int:
    """--threads: 0 (torch's default) to MAX_THREADS; a huge count would crash the OpenMP runtime (found by fuzzing)."""
    return _integer_in(text, 0, MAX_THREADS, f"0..{MAX_THREADS}")


def seed(text: str) -> int:
    """--seed: an integer in 0..2^64-1."""
    return _integer_in(text, 0, MAX_SEED, "0..2^64-1")


def add_threads(parser: argparse.ArgumentParser) -> None:
    """--threads, the one declaration; `main` applies it before running the command."""
    parser.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: default)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --threads, --json and --force of generate, invert and edit."""
    parser.add_argument("--model", default="embedded", help="'embedded' or a diffusers pipeline folder")
    add_threads(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def quiet_libraries() -> None:
    """Keep transformers / diffusers to errors and drop their weight-loading progress bars (CLI only)."""
    import diffusers  # heavy (~5 s with transformers): --help and usage errors never get here
    import transformers  # heavy: as above

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
