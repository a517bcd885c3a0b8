"""Where and how the harness runs: device description, timing statistics, and sharding over processes.

Sharding (``accelerate launch … icd bench …`` or torchrun): the cases are cut into fixed chunks (the batches the
model sees), chunk k goes to process k mod world, and the per-case records are gathered on every process. Chunk
contents do not depend on the number of processes, so every quality metric equals a single-process run's (with the
same threads per process); only timings differ.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from icd.runtime import ProcessGroup, synchronize

sync = synchronize  # the bench's name for it

T = TypeVar("T")


def describe_device(device: torch.device | str) -> str:
    """One line naming the hardware the timings come from."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def timed_runs(shards: Shards, cases: Sequence[T], run: Callable[[T], dict], *, warm_all: bool = False
               ) -> list[dict]:
    """`run` on this process's share of `cases` after one untimed warm-up run (lazy loading, kernel selection), or
    with `warm_all` one untimed run of every case (a compiled UNet compiles each case's graphs there, not while
    timed)."""
    mine = shards.mine(list(cases))
    if not mine:
        return []
    for c in mine if warm_all else mine[:1]:
        run(c)
    return [run(c) for c in mine]


def timing_cases(cases: Sequence[T], n: int) -> list[T]:
    """`n` cases spread evenly over the list (so over the kinds)."""
    n = min(n, len(cases))
    return [cases[(k * len(cases)) // n] for k in range(n)]


def case_records(method: str, chunk: Sequence[tuple[int, Any]], rows: Sequence[dict], *, images, shown: set[int]
                 ) -> list[dict]:
    """One record per case of a chunk of (index, case): the case's identity, its metric row, and its output image
    when the case is one of the examples (`shown`)."""
    out = []
    for (i, case), row, img in zip(chunk, rows, images):
        record = {"method": method, "index": i, "case_id": case.case_id, "kind": case.kind, **row}
        if i in shown:
            record["_image"] = img
        out.append(record)
    return out


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


def strip_images(records: list[dict]) -> tuple[list[dict], list[tuple[dict, np.ndarray]]]:
    """Records without example images, and the (record, image) pairs that carried one."""
    shown = [(r, r["_image"]) for r in records if "_image" in r]
    return [{k: v for k, v in r.items() if k != "_image"} for r in records], shown
