"""Device, process group, mixed precision and timing synchronisation for training and the bench (through
`accelerate`, no home-made launcher).

- `ProcessGroup`: the processes that `accelerate launch` (or torchrun) started. `accelerate.PartialState` joins the
  group (NCCL on GPUs, gloo on CPUs) and picks this process's device; a single process needs no launcher.
- `Precision`: autocast for the forward passes (``bf16`` or ``fp16``; weights and optimizer states stay fp32) and a
  loss scaler for ``fp16``. Losses and DDIM jumps run in fp32 because their inputs are fp32 (docs/method.md §2).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence

import torch

PRECISIONS = ("no", "bf16", "fp16")


def check_device(device: str) -> None:
    """ValueError for a device name this machine cannot run on (`auto`, `cpu`, `cuda`, `cuda:N`)."""
    if device in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device (use auto or cpu)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def default_threads() -> int:
    """torch CPU threads for a run that asks for none: one per core not already busy (the 1-minute load average),
    at least 1, at most torch's default. OpenMP threads wait for each other at every parallel region, so threads
    beyond the free cores cost far more than they give (docs/RELIABILITY.md, Threads)."""
    cores = os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(torch.get_num_threads(), cores - round(busy)))


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The weights' dtype for inference on `device`: None / "auto" = fp16 on CUDA, fp32 on a CPU. Half precision
    asked for on a CPU gives fp32 with a warning (CPU half-precision kernels are slow or missing)."""
    on_cuda = torch.device(device).type == "cuda" if str(device) != "auto" else torch.cuda.is_available()
    if dtype is None or dtype == "auto":
        return torch.float16 if on_cuda else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (--dtype): use auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype != torch.float32 and not on_cuda:
        import logging  # only on this path: the warning is the one log line of the module

        logging.getLogger(__name__).warning("%s weights on a CPU: upcast to fp32", str(dtype).removeprefix("torch."))
        return torch.float32
    return dtype


class ProcessGroup:
    """Rank, world size, device, barrier and gradient averaging across the launched processes."""

    def __init__(self, device: str = "auto"):
        from accelerate import PartialState  # heavy: a single-process CPU run never needs it

        check_device(device)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        state = PartialState(cpu=device == "cpu") if distributed or device == "auto" else None
        self.device = torch.device(device) if state is None else state.device
        dist = torch.distributed
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def average(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of each gradient over processes, so that every process applies the global-batch update."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad /= self.world


def shard_frozen(network: torch.nn.Module, group: ProcessGroup, *, keep: Sequence[torch.nn.Parameter]) -> int:
    """Shard `network`'s weights across the processes of `group` with PyTorch's FSDP (``fully_shard``, FSDP2) and
    return the number of sharded units: each entry of its block lists (a FLUX / SD3 transformer's
    ``transformer_blocks`` and ``single_transformer_blocks``, a UNet's ``down_blocks`` / ``up_blocks``) is one unit,
    the rest the root's. Each process then holds 1 / world of the frozen weights, and a call gathers one block at a
    time (the 12B FLUX.1 transformer: 45 GB of fp32 weights, 5.6 GB per process on 8). The parameters in `keep` (the
    LoRA adapters) stay whole on every process (``ignored_params``): their gradients are averaged by
    `ProcessGroup.average` and they are optimised, averaged (EMA) and checkpointed as in plain data parallel. Every
    process must run the same network calls in the same order (each call is a collective)."""
    from torch.distributed.device_mesh import init_device_mesh  # only for a sharded run
    from torch.distributed.fsdp import fully_shard  # as above

    mesh = init_device_mesh(group.device.type, (group.world,))
    kept = set(keep)
    units = 0
    for name, child in network.named_children():
        if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList):
            for block in child:
                fully_shard(block, mesh=mesh, ignored_params=kept & set(block.parameters()))
                units += 1
    fully_shard(network, mesh=mesh, ignored_params=kept)
    return units + 1


class Precision:
    """Autocast context, scaled backward and unscaled clipped optimizer steps for one precision mode."""

    def __init__(self, mode: str, device: torch.device):
        if mode not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
        self.mode, self.device = mode, device
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    def autocast(self):
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.mode == "bf16" else torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, group: ProcessGroup,
             max_norm: float = 1.0) -> None:
        """Average across processes, unscale, clip to `max_norm`, step (skipped by the scaler on inf/NaN)."""
        group.average(params)
        if self.scaler:
            self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler:
            self.scaler.step(opt)
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    def update(self) -> None:
        """Once per iteration, after every optimizer of the iteration has stepped."""
        if self.scaler:
            self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA), so a timer reads the work itself; a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that is a pure function of (seed, step, stream).

    Every random draw of training step `step` comes from here, so a resumed run repeats an uninterrupted one
    exactly without saving RNG state.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
