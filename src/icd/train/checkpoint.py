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
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from icd.io import fsync_dir, write_text_atomic


class CheckpointError(OSError):
    """A checkpoint could not be written (full or read-only disk); the previous one is intact."""


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
        state: dict[str, Any] = {"step": step, "optimizers": {}, "extra": dict(extra)}
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
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    ckpt = Path(run_dir) / pointer.read_text().strip()
    return ckpt if (ckpt / "state.json").is_file() else None


def load_checkpoint(
    ckpt: str | Path,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] = {},
) -> dict[str, Any]:
    """Restore modules and optimizers in place; return the saved state (``step``, ``extra``)."""
    ckpt = Path(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    for name, module in modules.items():
        module.load_state_dict(load_file(str(ckpt / f"model.{name}.safetensors")))
    for name, opt in optimizers.items():
        _optimizer_from_flat(opt, load_file(str(ckpt / f"optim.{name}.safetensors")), state["optimizers"][name])
    return state
