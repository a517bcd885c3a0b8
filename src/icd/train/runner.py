"""The bookkeeping every training loop shares: resume, progress bar, CSV log and checkpoint cadence.

    with TrainingRun(out, desc="train vae", total_steps=cfg.steps, columns=["loss", "lr"], modules=..., ...) as run:
        while not run.done:
            ...  # one optimizer step, a pure function of (seed, run.step)
            run.end_step({"loss": loss.item(), "lr": lr})

On resume the log keeps only the rows up to the restored step, so a resumed run's log.csv reads like an
uninterrupted one; its "seconds" column is training time summed over the resumed sessions.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from icd.io import folder_problem
from icd.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from icd.train.config import ConfigError, to_dict

log = logging.getLogger(__name__)


def lr_at(step: int, cfg) -> float:
    """Cosine decay from cfg.lr to cfg.lr_min over cfg.steps."""
    frac = min(step / max(cfg.steps, 1), 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * frac))


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


class TrainingRun:
    def __init__(self, out_dir: str | Path, *, desc: str, total_steps: int, columns: Sequence[str],
                 modules: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                 config: Any, log_every: int, checkpoint_every: int, resume: bool = True, is_main: bool = True,
                 stateful: Mapping[str, Any] = {}, images_per_step: int = 0, tracker=None):
        self.out = Path(out_dir)
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
        ckpt = latest_checkpoint(self.out) if resume else None
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
