"""The bookkeeping every training loop shares: resume, progress bar, CSV log and checkpoint cadence.

    with TrainingRun(out, desc="train vae", total_steps=cfg.steps, columns=["loss", "lr"], modules=..., ...) as run:
        while not run.done:
            ...  # one optimizer step, a pure function of (seed, run.step)
            run.end_step({"loss": loss.item(), "lr": lr})

On resume the log keeps only the rows up to the restored step, so a resumed run's log.csv reads like an
uninterrupted one; its "seconds" column is training time summed over the resumed sessions.

A run folder records what its weights are (``run.json``: the config, its class, the model's family and any
trainer-specific identity such as the LoRA target modules). `check_run`, called by every trainer before it loads a
model, refuses a config that differs from the record in a field outside `MAY_CHANGE`, a fresh run that would
replace another run's ``final/``, and a folder whose checkpoints are all damaged (docs/training.md §3).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from icd.io import folder_problem, read_json, write_text_atomic
from icd.models.loading import ModelError, resolve_model_path
from icd.train.checkpoint import (
    checkpoint_problem,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from icd.train.config import ConfigError, to_dict

log = logging.getLogger(__name__)


def lr_at(step: int, cfg) -> float:
    """Cosine decay from cfg.lr to cfg.lr_min over cfg.steps."""
    frac = min(step / max(cfg.steps, 1), 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))


def warmup_lr(step: int, cfg) -> float:
    """A linear warm-up over cfg.warmup_steps (cfg.lr / warmup_steps at step 0), then `lr_at`'s cosine."""
    return cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else lr_at(step, cfg)


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> float:
    """Give every parameter group of `optimizers` the learning rate `lr` times the group's ``lr_scale`` (1 when it
    has none); set each step, so resume is exact."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


@contextlib.contextmanager
def run_folder(out_dir: str | Path) -> Iterator[Path]:
    """Check that `out_dir` can be written before any training starts (`ConfigError` if not); if the run fails
    before its first checkpoint, remove the folders it created (its data cache included), so a failed start leaves
    no empty run folder. A folder that existed before, or holds a checkpoint, is kept."""
    out = Path(out_dir)
    problem = folder_problem(out)
    if problem:
        raise ConfigError(f"out_dir {out}: {problem}")
    created = next((q for q in reversed((out, *out.parents)) if not q.exists()), None)  # the topmost new folder
    try:
        yield out
    except Exception:
        if created is not None and latest_checkpoint(out) is None:
            shutil.rmtree(created, ignore_errors=True)
        raise


RUN_FILE = "run.json"
# Config fields a resumed run may change: how long and how the run is carried out, never what its weights are or
# what they learn (docs/training.md §3). Every other field is the run's identity.
MAY_CHANGE = frozenset({
    "out_dir", "steps", "lr_min", "checkpoint_every", "log_every", "threads",  # length, end of the cosine, cadence
    "device", "mixed_precision", "gradient_checkpointing", "gradient_accumulation",  # same update, other hardware
    "validate_every", "validation_prompts", "n_validation", "log_to",  # monitoring
    "tau", "n_eval", "n_scale_images", "validation_cases", "validation_seed_start", "validation_steps",
    "text_scales", "image_scales",  # read only after training (inference settings, evaluations)
})


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), so a record and a config compare equal."""
    return json.loads(json.dumps(value))


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _family(config: Any) -> str | None:
    """The pipeline class of the config's local model folder (None: no model field, a hub id, or unreadable; the
    loader reports those)."""
    model = getattr(config, "model", None)
    if not isinstance(model, str) or not (model == "embedded" or Path(model).is_dir()):
        return None
    try:
        index = read_json(resolve_model_path(model) / "model_index.json")
    except (ModelError, OSError, ValueError):
        return None
    return index.get("_class_name") if isinstance(index, dict) else None


def run_record(config: Any, identity: Mapping[str, Any] = {}) -> dict[str, Any]:
    """What `run.json` holds: the config (and its class) plus derived identity (the model's family, ...)."""
    derived = {"family": _family(config), **identity}
    return {"format": 1, "config_class": type(config).__name__, "config": _plain(to_dict(config)),
            "identity": _plain({k: v for k, v in derived.items() if v is not None})}


def _recorded(out: Path) -> dict[str, Any] | None:
    """The run record of `out`: run.json, else (a run from before run.json) the config of its newest intact
    checkpoint; None if neither can be read."""
    try:
        record = read_json(out / RUN_FILE)
        if isinstance(record, dict) and isinstance(record.get("config"), dict):
            return record
    except (OSError, ValueError):
        pass
    steps = sorted(out.glob("step-??????"), reverse=True)
    for ckpt in steps:
        if checkpoint_problem(ckpt) is None:
            config = read_json(ckpt / "state.json").get("extra", {}).get("config")
            if isinstance(config, dict):
                return {"config": config}
    return None


def _differences(record: dict[str, Any], config: Any, identity: dict[str, Any]) -> list[str]:
    """"field=recorded; this config says value" for each identity field that differs from the record."""
    cls = type(config)
    if record.get("config_class", cls.__name__) != cls.__name__:
        return [f"a {record['config_class']} run; this is a {cls.__name__}"]
    try:
        defaults = _plain(to_dict(cls()))
    except (TypeError, ValueError):  # a config class whose defaults alone are not a valid config
        defaults = {}
    now, then = _plain(to_dict(config)), record["config"]
    out = []
    for name, value in now.items():
        if name in MAY_CHANGE:
            continue
        old = then.get(name, defaults.get(name, value))  # a field newer than the record: the run had its default
        if old != value:
            out.append(f"{name}={_shown(old)}; this config says {_shown(value)}")
    for name, value in identity.items():
        old = record.get("identity", {}).get(name)
        if old is not None and old != value:
            out.append(f"{name}={_shown(old)}; this config gives {_shown(value)}")
    return out


def check_run(config: Any, *, resume: bool = True, identity: Mapping[str, Any] = {}) -> None:
    """Refuse, in one `ConfigError` line and before any model loads or any file changes, a run whose out_dir holds
    weights this config would not continue:

    - the recorded run differs in a field outside `MAY_CHANGE` (rank, boundaries, model, data, seed, ...) or in
      its derived identity (the model's family, the LoRA targets);
    - ``final/`` exists and this run would not start from the run that wrote it (``resume`` off, or no checkpoint
      to resume from);
    - checkpoints exist, ``resume`` is on, and none is intact (`CheckpointError`).
    """
    out = Path(config.out_dir)
    if not out.is_dir():
        return
    final = out / "final"
    if not (final.exists() or (out / "latest").exists() or any(out.glob("step-??????"))):
        return  # nothing to protect (a stale run.json of a run that failed before its first checkpoint)
    record = _recorded(out)
    current = run_record(config, identity)["identity"]
    if record is not None:
        diffs = _differences(record, config, current)
        if diffs:
            raise ConfigError(f"out_dir {out} holds a run with {diffs[0]}: use a new out_dir or the same value"
                              + (f" ({len(diffs) - 1} more field(s) differ)" if len(diffs) > 1 else ""))
    if final.exists():
        if not resume:
            raise ConfigError(f"out_dir {out} holds a finished run (final/); a fresh run (--no-resume) would replace "
                              "it: use a new out_dir, or resume it")
        if resume_checkpoint(out) is None:
            raise ConfigError(f"out_dir {out} holds final/ but no checkpoint to resume from; a fresh run would "
                              "replace it: use a new out_dir")
    elif resume:
        resume_checkpoint(out)  # CheckpointError now, before any model loads, if no checkpoint is intact


class TrainingRun:
    def __init__(self, out_dir: str | Path, *, desc: str, total_steps: int, columns: Sequence[str],
                 modules: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                 config: Any, log_every: int, checkpoint_every: int, resume: bool = True, is_main: bool = True,
                 stateful: Mapping[str, Any] = {}, images_per_step: int = 0, tracker=None,
                 identity: Mapping[str, Any] = {}):
        self.out = Path(out_dir)
        if Path(config.out_dir) == self.out:  # the trainer checked before loading its model; this checks again
            check_run(config, resume=resume, identity=identity)
        self.out.mkdir(parents=True, exist_ok=True)
        self.desc, self.total_steps, self.columns = desc, total_steps, list(columns)
        self.modules, self.optimizers, self.config = modules, optimizers, config
        self.log_every, self.checkpoint_every = log_every, checkpoint_every
        self.is_main = is_main  # only the main process writes logs and checkpoints (every process resumes)
        self.stateful = dict(stateful)  # small objects with state_dict()/load_state_dict() (e.g. a loss scaler)
        self.images_per_step = images_per_step  # > 0: an images_per_s column (global batch / step time)
        self.tracker = tracker  # an `icd.train.trackers` tracker (main process only), or None
        if images_per_step:
            self.columns.append("images_per_s")
        self.step = 0
        ckpt = resume_checkpoint(self.out) if resume else None
        if is_main:  # the record of what this folder's weights are (check_run)
            write_text_atomic(self.out / RUN_FILE, json.dumps(run_record(config, identity), indent=1) + "\n")
        if ckpt is not None:
            state = load_checkpoint(ckpt, modules=modules, optimizers=optimizers)
            self.step = state["step"]
            for name, obj in self.stateful.items():
                obj.load_state_dict(state["extra"].get("stateful", {}).get(name, {}))
            log.info("resumed from %s (step %d)", ckpt, self.step)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def __enter__(self) -> TrainingRun:
        self._bar = tqdm(total=self.total_steps, initial=self.step, desc=self.desc, unit="step",
                         disable=not self.is_main)
        self._t0 = time.time()
        self._tick = (self._t0, self.step)  # (time, step) of the last log row: throughput over the interval
        if not self.is_main:
            return self
        path = self.out / "log.csv"
        rows: list[list[str]] = []
        if self.step and path.is_file():
            with open(path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= self.step]
            if rows:  # "seconds" is cumulative training time across resumes
                self._t0 -= float(rows[-1][-1])
        self._file = open(path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerows([["step", *self.columns, "seconds"], *rows])
        return self

    def end_step(self, values: Mapping[str, float]) -> None:
        """Count one finished optimizer step; log and checkpoint on their cadence (and at the end)."""
        self.step += 1
        self._bar.update(1)
        if not self.is_main:
            return
        if self.step % self.log_every == 0 or self.done:
            values = dict(values)
            first = self.columns[0]
            postfix = {first: f"{values[first]:.4g}"}
            if self.images_per_step:
                now, (then, before) = time.time(), self._tick
                values["images_per_s"] = round(self.images_per_step * (self.step - before) / max(now - then, 1e-9), 3)
                self._tick = (now, self.step)
                postfix["img/s"] = f"{values['images_per_s']:.3g}"
            self._bar.set_postfix(postfix)
            if self.tracker is not None:
                self.tracker.log(self.step, {k: float(v) for k, v in values.items()})
            self._writer.writerow([self.step, *(values[c] for c in self.columns), round(time.time() - self._t0, 1)])
            self._file.flush()
        if self.step % self.checkpoint_every == 0 or self.done:
            save_checkpoint(self.out, self.step, modules=self.modules, optimizers=self.optimizers,
                            extra={"config": to_dict(self.config),
                                   "stateful": {k: v.state_dict() for k, v in self.stateful.items()}})

    def __exit__(self, *exc) -> None:
        self._bar.close()
        if self.is_main:
            self._file.close()
            if self.tracker is not None:
                self.tracker.close()
