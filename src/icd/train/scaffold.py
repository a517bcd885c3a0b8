"""One training loop for every trainer (vae, judge, teacher, guidance, icd, ip2p): ``run_training(trainer)``.

A trainer supplies its model, its loss and its data (a `Trainer` subclass); the scaffold owns the rest, in order:

1. threads, `check_run` (the run folder's record, before any model loads or any file changes), the process group
   and precision, the split of each process's rows into micro-batches and the tracker's package;
2. the trainer's own checks (`Trainer.check`: its dataset, its input files), still before any model loads;
3. `Trainer.load` (frozen models, data), the tracker, ``torch.manual_seed(cfg.seed)``, `Trainer.build` (the trained
   modules, one `Update` per optimizer and an optional `EMA`);
4. the loop in a `TrainingRun` (resume, log.csv, checkpoints, throughput): each step the learning rate
   (`Trainer.lr`), this process's rows of the step's global batch (`Trainer.batch`, a pure function of seed and
   step, so a resumed run repeats an uninterrupted one), the update (`Trainer.train_step`: by default `Trainer.loss`
   per micro-batch under autocast, then per optimizer one step averaged across processes and clipped), the EMA,
   validation every ``validate_every`` steps on the main process, a barrier;
5. the EMA weights replace the trained ones, a last validation unless the last step's already saw the exported
   weights, `Trainer.export` on the main process, a barrier.

Several processes (``accelerate launch`` / ``torchrun``) exist only for configs with a ``device`` field
(`icd.train.config.ProcessConfig`); each takes rows ``rank::world`` of the same global batch and gradients are
averaged before clipping, so N processes apply the update of one.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icd.runtime import Precision, ProcessGroup
from icd.train.config import ConfigError, to_dict
from icd.train.feed import make_feed, open_data
from icd.train.runner import TrainingRun, check_run, lr_at, set_lr
from icd.train.scale import describe_batch, local_rows, micro_batches, precision_mode
from icd.train.trackers import check_tracker, open_tracker

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ EMA
def _lerp(pairs, decay: float) -> None:
    with torch.no_grad():
        for average, weight in pairs:
            average.lerp_(weight.detach(), 1.0 - decay)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move every parameter of `ema` towards its twin in `model` by ``1 - decay`` (`EMA`'s one step)."""
    _lerp(zip(ema.parameters(), model.parameters()), decay)


class EMA:
    """Exponential moving averages of trained weights, checkpointed with the run (`modules`).

    After optimizer step s (counted from 0) each average moves towards its weight,
    ``average <- average + (1 - d_s) (weight - average)``, with the warm-up ``d_s = min(decay, (1 + s) / (10 + s))``:
    0.1 after the first step, 0.5 after the ninth, `decay` from then on once it is reached; the initial weights stop
    dominating the average within a few steps. It is the rule of every trainer (teacher, icd, ip2p).

    `weights` maps a checkpoint name to what is averaged: a module (its parameters; the average is a frozen copy of
    the module) or ``{name: [parameters]}`` (the average is a ``ModuleDict`` of ``ParameterList``s).
    """

    def __init__(self, decay: float, weights: Mapping[str, torch.nn.Module | Mapping[str, Sequence[torch.Tensor]]]):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.modules: dict[str, torch.nn.Module] = {}
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, live in weights.items():
            if isinstance(live, torch.nn.Module):
                average = copy.deepcopy(live).requires_grad_(False)
                self._pairs += list(zip(average.parameters(), live.parameters()))
            else:
                average = torch.nn.ModuleDict({key: torch.nn.ParameterList(
                    [torch.nn.Parameter(p.detach().clone(), requires_grad=False) for p in params])
                    for key, params in live.items()})
                self._pairs += [pair for key, params in live.items() for pair in zip(average[key], params)]
            self.modules[name] = average

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step`."""
        _lerp(self._pairs, self.decay_at(step))

    def copy_to(self) -> None:
        """Write the averages into the trained weights (the scaffold does so after the last step)."""
        with torch.no_grad():
            for average, weight in self._pairs:
                weight.copy_(average)


# ------------------------------------------------------------------------------------------------ updates
@dataclass
class Update:
    """One optimizer and the parameters it steps: their gradients are averaged across processes, those in `clip`
    (default: all) clipped to `max_norm` (None: no clipping), then the optimizer steps."""

    name: str  # the optimizer's name in checkpoints
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]
    clip: list[torch.Tensor] | None = None
    max_norm: float | None = 1.0


@dataclass
class Parts:
    """What `Trainer.build` returns: the checkpointed modules, the updates and an optional EMA (whose averages are
    checkpointed beside the modules and become the result)."""

    modules: dict[str, torch.nn.Module]
    updates: list[Update]
    ema: EMA | None = None


def optimizer_step(update: Update, precision: Precision, sync: ProcessGroup) -> None:
    """Average across processes, unscale (fp16), clip, step (skipped by the scaler on inf/NaN), zero the
    gradients."""
    sync.average(update.params)
    if precision.scaler:
        precision.scaler.unscale_(update.optimizer)
    if update.max_norm is not None:
        torch.nn.utils.clip_grad_norm_(update.params if update.clip is None else update.clip, update.max_norm)
    if precision.scaler:
        precision.scaler.step(update.optimizer)
    else:
        update.optimizer.step()
    update.optimizer.zero_grad(set_to_none=True)


def select(batch: Any, rows: torch.Tensor) -> Any:
    """Rows `rows` of a batch: tensors indexed, objects with ``index(rows)`` (`Cond`, trainer batches) asked,
    mappings taken apart; anything else (a generator, boundaries) is shared by every row."""
    if isinstance(batch, torch.Tensor):
        return batch[rows.to(batch.device)]
    if hasattr(batch, "index") and not isinstance(batch, (str, Sequence)):
        return batch.index(rows)
    if isinstance(batch, Mapping):
        return {k: select(v, rows) for k, v in batch.items()}
    return batch


def accumulate(loss: Callable[[Any], Mapping[str, torch.Tensor]], batch: Any, *, rows: int, accumulation: int,
               precision: Precision, objective: str) -> dict[str, float]:
    """Loss and backward of `objective` per micro-batch of the process's `rows`, each weighted by its share of the
    rows, so the accumulated gradient is the gradient of the mean over all rows. Returns every loss term's mean."""
    parts = micro_batches(rows, accumulation)
    totals: dict[str, float] = {}
    for part, weight in parts:
        with precision.autocast():
            losses = loss(batch if len(parts) == 1 else select(batch, part))
        precision.backward(weight * losses[objective])
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + weight * float(value.detach())
    return totals


# ------------------------------------------------------------------------------------------------ trainers
class Trainer:
    """A trainer's own parts; `run_training` calls them (module docstring). Subclasses set `name` and `columns` and
    implement `build`, `batch`, `loss` (or `train_step`) and `export`.

    Available from `check` on: ``cfg``, ``out`` (the run folder), ``sync`` (`ProcessGroup`) and ``precision``;
    from `build` on, ``parts``.
    """

    name = "run"  # the progress bar's "train NAME"
    columns: tuple[str, ...] = ("loss",)  # log.csv columns; the first is the objective that is back-propagated
    throughput = False  # an images_per_s column (global batch / step time)
    validate_everywhere = False  # True: every process validates (a sharded network's calls); only the main one writes

    def __init__(self, cfg):
        self.cfg, self.out = cfg, Path(cfg.out_dir)
        self.sync: ProcessGroup
        self.precision: Precision
        self.parts: Parts

    def identity(self) -> dict[str, Any]:
        """What shapes the weights besides the config (run.json, `check_run`)."""
        return {}

    def check(self) -> None:
        """Checks before any model loads (the dataset, input files): a one-line `ConfigError` / `DataError`."""

    def load(self) -> None:
        """Frozen models and the data, before ``torch.manual_seed(cfg.seed)``."""

    def build(self) -> Parts:
        raise NotImplementedError

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (a pure function of the step, so resume is exact)."""
        return lr_at(step, self.cfg)

    def batch(self, step: int, rows: torch.Tensor) -> Any:
        """Rows `rows` of global batch `step`, on this process's device: a pure function of (seed, step)."""
        raise NotImplementedError

    def loss(self, batch: Any) -> Mapping[str, torch.Tensor]:
        """{term: scalar} of a (micro-)batch; ``columns[0]`` is back-propagated."""
        raise NotImplementedError

    def train_step(self, batch: Any, rows: int) -> dict[str, float]:
        """One iteration on this process's `rows` rows: `accumulate` the loss, then step every `Update`."""
        values = accumulate(self.loss, batch, rows=rows, accumulation=getattr(self.cfg, "gradient_accumulation", 1),
                            precision=self.precision, objective=self.columns[0])
        for update in self.parts.updates:
            optimizer_step(update, self.precision, self.sync)
        self.precision.update()
        return values

    def log_values(self, values: dict[str, float]) -> dict[str, float]:
        """The step's row of log.csv from the loss terms (and ``lr``); add derived columns here."""
        return values

    def validator(self) -> Callable[[int], Any] | None:
        """A function validating the current weights at a step (main process), or None for no validation."""
        return None

    def export(self) -> Any:
        """Write the result (main process only) and return what the train function returns."""
        raise NotImplementedError


class FeedTrainer(Trainer):
    """A trainer on `icd.train.feed` data (world renders, or a real dataset with a "skipped" column), validated on
    the feed's first `n_validation` examples every ``validate_every`` steps and at the end of a real-data run."""

    source = None

    def check(self) -> None:
        self.source = open_data(self.cfg)  # the dataset is checked before any model is loaded
        if self.source is not None:
            self.columns = (*self.columns, "skipped")

    def make_feed(self, model) -> None:
        self.feed = make_feed(self.source, model, self.cfg, out=self.out, rank=self.sync.rank, world=self.sync.world)

    def local(self, step: int, draws: dict, rows: torch.Tensor) -> tuple[dict, torch.Tensor, Any]:
        """This process's rows of the step's global draws, and their latents and conditioning."""
        d = {k: v[rows].to(self.sync.device) for k, v in draws.items()}
        return (d, *self.feed.rows(step, d["idx"], self.sync.device))

    def log_values(self, values: dict[str, float]) -> dict[str, float]:
        return values if self.source is None else values | {"skipped": self.feed.skipped_total}

    def validator(self) -> Callable[[int], Any] | None:
        cfg = self.cfg
        if not (cfg.n_validation > 0 and (cfg.validate_every or self.source is not None)):
            return None
        images, captions = self.feed.validation(cfg.n_validation)

        def validate(step: int) -> None:
            log.info("validation at step %d: %s", step, self.validate(images, captions, step))

        return validate

    def validate(self, images, captions: list[str], step: int) -> dict:
        """One validation row of the current weights on `images` / `captions` (`icd.train.validation`)."""
        raise NotImplementedError


def process_group(cfg) -> ProcessGroup:
    """The config's process group: ``cfg.device`` (`ProcessConfig`); a config without one trains in one CPU
    process and refuses a multi-process launch (each process would train the whole batch into the same folder)."""
    name = type(cfg).__name__
    device = getattr(cfg, "device", None)
    if device is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"{name} trains in one process (it has no device field); launch it without "
                              "accelerate / torchrun")
        device = "cpu"
    try:
        return ProcessGroup(device)
    except ValueError as e:  # an unknown device name, or cuda on a machine without one (before any compute)
        raise ConfigError(f"{name}.device: {e}") from None


def run_training(trainer: Trainer, *, resume: bool = True) -> Any:
    """Train `trainer` (module docstring); returns its `export` (on other processes than the main one: the run's
    ``final/``)."""
    cfg, out = trainer.cfg, trainer.out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    identity = trainer.identity()
    check_run(cfg, resume=resume, identity=identity)  # before any model loads or any file changes
    sync = trainer.sync = process_group(cfg)
    precision = trainer.precision = Precision(precision_mode(cfg, sync) if hasattr(cfg, "mixed_precision") else "no",
                                              sync.device)
    rows = torch.arange(sync.rank, cfg.batch_size, sync.world)
    micro_batches(local_rows(cfg, sync), getattr(cfg, "gradient_accumulation", 1))  # ConfigError if it cannot split
    log_to = getattr(cfg, "log_to", "none")
    check_tracker(log_to)
    trainer.check()
    out.mkdir(parents=True, exist_ok=True)
    trainer.load()
    tracker = open_tracker(log_to, out, to_dict(cfg)) if sync.is_main and log_to != "none" else None
    torch.manual_seed(cfg.seed)
    parts = trainer.parts = trainer.build()
    modules = dict(parts.modules) | (parts.ema.modules if parts.ema is not None else {})
    run = TrainingRun(out, desc=f"train {trainer.name}", total_steps=cfg.steps, columns=trainer.columns,
                      modules=modules, optimizers={u.name: u.optimizer for u in parts.updates}, config=cfg,
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, resume=resume,
                      is_main=sync.is_main, stateful={"precision": precision},
                      images_per_step=cfg.batch_size if trainer.throughput else 0, tracker=tracker, identity=identity)
    if hasattr(cfg, "gradient_accumulation"):
        log.info("train %s: %s", trainer.name, describe_batch(cfg, sync, precision.mode))
    validate = trainer.validator() if sync.is_main or trainer.validate_everywhere else None
    every = getattr(cfg, "validate_every", 0)
    with run:
        while not run.done:
            step = run.step
            lr = set_lr([u.optimizer for u in parts.updates], trainer.lr(step))
            values = trainer.train_step(trainer.batch(step, rows), len(rows))
            if parts.ema is not None:
                parts.ema.update(step)
            run.end_step(trainer.log_values({**values, "lr": lr}))
            if validate is not None and every and run.step % every == 0:
                validate(run.step)
            sync.barrier()  # no process reads a checkpoint before the main process has written it
    if parts.ema is not None:  # the averaged weights are the result
        parts.ema.copy_to()
    if validate is not None and (not every or cfg.steps % every or parts.ema is not None):
        validate(run.step)
    result = trainer.export() if sync.is_main else out / "final"
    sync.barrier()
    return result

