"""Atomic training checkpoints: safetensors for tensors, JSON for everything else, never pickles.

Layout of a run directory::

    run/
      latest                  # name of the newest complete checkpoint (replaced atomically)
      step-000500/
        model.<name>.safetensors     # module weights
        optim.<name>.safetensors     # optimizer tensors (moments, step counts)
        state.json                   # step, optimizer param groups and scalar state, caller extras

A checkpoint is written into ``step-XXXXXX.tmp``, renamed into place, and only then named in ``latest``; older
checkpoints are deleted after that. A crash at any moment leaves the previous checkpoint intact.

A checkpoint damaged afterwards (a truncated file, a half-copied run folder) is found by `checkpoint_problem`
without loading its tensors; `resume_checkpoint` then falls back to the newest intact one, with a warning naming the
damaged one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from icd.io import fsync_dir, write_text_atomic

log = logging.getLogger(__name__)


class CheckpointError(OSError):
    """A checkpoint could not be written (full or read-only disk; the previous one is intact), or none that is
    intact can be read back."""


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
    extra: Mapping[str, Any] = {},
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically and return its directory.

    A failed write (full disk, read-only folder) removes the partial temporary folder and raises `CheckpointError`
    naming the checkpoint that is still intact.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"step-{step:06d}"
    tmp = run_dir / f"step-{step:06d}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        state: dict[str, Any] = {"step": step, "optimizers": {}, "extra": dict(extra),
                                 "modules": sorted(modules)}  # which files a restore needs (checkpoint_problem)
        for name, module in modules.items():
            weights = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            save_file(weights, str(tmp / f"model.{name}.safetensors"))
        for name, opt in optimizers.items():
            tensors, meta = _optimizer_to_flat(opt)
            save_file(tensors, str(tmp / f"optim.{name}.safetensors"))
            state["optimizers"][name] = meta
        write_text_atomic(tmp / "state.json", json.dumps(state, indent=1))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(run_dir / "latest", final.name + "\n")
        fsync_dir(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; {kept}") from None
    for old in sorted(run_dir.glob("step-??????"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named in ``latest`` (None without one); `resume_checkpoint` also checks that it is intact."""
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    try:
        ckpt = Path(run_dir) / pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return ckpt if (ckpt / "state.json").is_file() else None


def _read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of `ckpt`, or ValueError / OSError saying why it cannot be read."""
    state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json holds no step")
    return state


def _tensor_file_problem(path: Path) -> str | None:
    """Why safetensors file `path` cannot be read (missing, truncated, not safetensors); the header alone is read:
    safetensors checks that the file covers every tensor it declares."""
    try:
        with safe_open(str(path), framework="pt"):
            return None
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, SafetensorError) as e:
        return f"{path.name} is unreadable ({str(e).strip() or type(e).__name__})"


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why checkpoint folder `ckpt` cannot be restored, in a few words (None if intact): state.json unreadable, or
    a weights or optimizer file missing, truncated or not safetensors. No tensor is loaded."""
    ckpt = Path(ckpt)
    try:
        state = _read_state(ckpt)
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"state.json is unreadable ({getattr(e, 'strerror', None) or e})"
    names = [f"model.{m}.safetensors" for m in state.get("modules", [])]
    names += [f"optim.{o}.safetensors" for o in state.get("optimizers", {})]
    names += sorted(p.name for p in ckpt.glob("*.safetensors") if p.name not in names)  # checkpoints before "modules"
    for name in names:
        problem = _tensor_file_problem(ckpt / name)
        if problem:
            return problem
    return None


def resume_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of `run_dir` (None if it holds none at all).

    The one named in ``latest`` comes first; when it is damaged, each older ``step-NNNNNN`` in turn, with one
    warning naming the damaged checkpoint. `CheckpointError` when checkpoints exist but none is intact."""
    run_dir = Path(run_dir)
    first = latest_checkpoint(run_dir)
    steps = sorted(run_dir.glob("step-??????"), reverse=True)
    candidates = ([first] if first is not None else []) + [p for p in steps if p != first]
    if first is not None:  # never fall back to a checkpoint newer than latest (a half-written one was renamed)
        candidates = [p for p in candidates if p.name <= first.name]
    damaged: list[str] = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if damaged:
                log.warning("checkpoint %s is damaged (%s); resuming from %s", damaged[0], damaged[1], ckpt)
            return ckpt
        if not damaged:
            damaged = [str(ckpt), problem]
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {run_dir}: {damaged[0]}: {damaged[1]}; use a new out_dir, "
                              "or --no-resume to start afresh")
    return None


def load_checkpoint(
    ckpt: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
) -> dict[str, Any]:
    """Restore modules and optimizers in place; return the saved state (``step``, ``extra``).

    A damaged checkpoint (see `checkpoint_problem`) raises `CheckpointError` naming the file, before any module
    changes."""
    ckpt = Path(ckpt)
    problem = checkpoint_problem(ckpt)
    if problem is None:
        missing = [f"model.{m}.safetensors" for m in modules if not (ckpt / f"model.{m}.safetensors").is_file()]
        missing += [f"optim.{o}.safetensors" for o in optimizers if not (ckpt / f"optim.{o}.safetensors").is_file()]
        problem = f"{missing[0]} is missing" if missing else None
    if problem:
        raise CheckpointError(f"checkpoint {ckpt}: {problem}")
    state = _read_state(ckpt)
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ckpt / f"model.{name}.safetensors")))
    for name, opt in optimizers.items():
        _optimizer_from_flat(opt, load_file(str(ckpt / f"optim.{name}.safetensors")), state["optimizers"][name])
    return state
