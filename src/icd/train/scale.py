"""Scale-out bookkeeping of `icd.train.scaffold`: the global batch's decomposition, micro-batches for gradient
accumulation and the precision a run uses."""

from __future__ import annotations

import logging

import torch

from icd.runtime import ProcessGroup
from icd.train.config import ConfigError

log = logging.getLogger(__name__)


def micro_batches(rows: int, accumulation: int) -> list[tuple[torch.Tensor, float]]:
    """Split a process's `rows` into `accumulation` micro-batches: [(row indices, weight)], weights = share of the
    rows, so the accumulated gradient of the weighted means equals the gradient of the mean over all rows."""
    if accumulation > rows:
        raise ConfigError(f"gradient_accumulation {accumulation} exceeds this process's {rows} row(s) per step; "
                          "raise batch_size or lower gradient_accumulation")
    return [(part, len(part) / rows) for part in torch.arange(rows).tensor_split(accumulation)]


def precision_mode(cfg, sync: ProcessGroup) -> str:
    """The autocast mode a run uses: `cfg.mixed_precision`, except that ``device = "auto"`` landing on a CPU trains
    in fp32 (CPU autocast emulates half precision and is several times slower; measured ~5x on this 2-core CPU),
    with a one-line warning. An explicit ``device = "cpu"`` keeps the mode (the tests exercise autocast that way)."""
    if cfg.mixed_precision != "no" and cfg.device == "auto" and sync.device.type == "cpu":
        log.warning("mixed_precision = %r on a CPU (device = 'auto'): training in fp32, which is faster there; "
                    "set device = 'cpu' to force autocast", cfg.mixed_precision)
        return "no"
    return cfg.mixed_precision


def local_rows(cfg, sync: ProcessGroup) -> int:
    """How many rows of each global batch this process trains on (rows ``rank::world``)."""
    return len(range(sync.rank, cfg.batch_size, sync.world))


def describe_batch(cfg, sync: ProcessGroup, precision: str) -> str:
    """'global batch 512 = 8 per micro-batch x 8 accumulation x 8 processes' (logged at the start of a run)."""
    local = local_rows(cfg, sync)
    micro = -(-local // cfg.gradient_accumulation)
    return (f"global batch {cfg.batch_size} = {micro} per micro-batch x {cfg.gradient_accumulation} accumulation x "
            f"{sync.world} process(es) on {sync.device}, {precision} precision, gradient checkpointing "
            f"{'on' if cfg.gradient_checkpointing else 'off'}")

