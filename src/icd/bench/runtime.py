"""Where and how the harness runs: device description, timing statistics, and sharding over processes.

Sharding (``accelerate launch … icd bench …`` or torchrun): the cases are cut into fixed chunks (the batches the
model sees), chunk k goes to process k mod world, and the per-case records are gathered on every process. Chunk
contents do not depend on the number of processes, so every quality metric equals a single-process run's (with the
same threads per process); only timings differ.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from icd.train.accel import ProcessGroup

T = TypeVar("T")


def describe_device(device: torch.device | str) -> str:
    """One line naming the hardware the timings come from."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def timing_stats(seconds: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max) of per-image wall times."""
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "count": len(seconds)}


class Stopwatch:
    """``with sw("invert"): ...`` accumulates wall time per label (synchronising CUDA so GPU work is counted)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, label: str):
        sw = self

        class _Span:
            def __enter__(self):
                sw._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sw._sync()
                sw.seconds[label] = sw.seconds.get(label, 0.0) + time.perf_counter() - self.t0

        return _Span()


class Shards:
    """This process's share of the work and the gather of everyone's records (one process: a no-op)."""

    def __init__(self, device: str = "auto"):
        self.group = ProcessGroup(device)

    @property
    def device(self) -> torch.device:
        return self.group.device

    @property
    def is_main(self) -> bool:
        return self.group.is_main

    def mine(self, chunks: Sequence[T]) -> list[T]:
        return [c for k, c in enumerate(chunks) if k % self.group.world == self.group.rank]

    def gather(self, records: list[Any]) -> list[Any]:
        """Every process's records, concatenated in rank order (objects are pickled by torch.distributed)."""
        if not self.group.active:
            return list(records)
        parts: list[list[Any] | None] = [None] * self.group.world
        torch.distributed.all_gather_object(parts, records)
        return [r for part in parts for r in (part or [])]

    def barrier(self) -> None:
        self.group.barrier()


def chunked(items: Sequence[T], size: int, key: Callable[[T], Any] = lambda x: None) -> list[list[T]]:
    """Consecutive chunks of at most `size` items that never mix two values of `key` (e.g. edit kinds)."""
    chunks: list[list[T]] = []
    for item in items:
        if chunks and len(chunks[-1]) < size and key(chunks[-1][0]) == key(item):
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


def example_indices(cases: Sequence, per_kind: int) -> set[int]:
    """Indices of the first `per_kind` cases of each kind (their outputs go into the example grid)."""
    seen: dict[str, int] = {}
    out = set()
    for i, c in enumerate(cases):
        if seen.get(c.kind, 0) < per_kind:
            out.add(i)
            seen[c.kind] = seen.get(c.kind, 0) + 1
    return out
