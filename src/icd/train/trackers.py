"""Optional experiment trackers besides log.csv: TensorBoard or Weights & Biases, when installed (never required).

`open_tracker(kind, out_dir, config)` is called before training starts, so a tracker that is asked for but not
installed stops the run with one line instead of failing at the first log step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from icd.train.config import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class NoTracker:
    def log(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(NoTracker):
    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # optional package: imported only when asked for

        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB(NoTracker):
    def __init__(self, out_dir: Path, config: dict[str, Any]):
        import wandb  # optional package: imported only when asked for

        self.run = wandb.init(dir=str(out_dir), config=config, name=out_dir.name, resume="allow")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


def check_tracker(kind: str) -> None:
    """ConfigError (one line) when tracker `kind` is asked for but its package is not installed."""
    if kind in PACKAGES and importlib.util.find_spec(PACKAGES[kind]) is None:
        raise ConfigError(f"log_to = {kind!r} needs the {PACKAGES[kind]} package (pip install {PACKAGES[kind]}); "
                          "or set log_to = 'none' (log.csv is always written)")


def open_tracker(kind: str, out_dir: str | Path, config: dict[str, Any]) -> NoTracker:
    check_tracker(kind)
    if kind == "tensorboard":
        return TensorBoard(Path(out_dir))
    if kind == "wandb":
        return WandB(Path(out_dir), config)
    return NoTracker()
