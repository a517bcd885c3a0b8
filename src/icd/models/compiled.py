"""The compiled inference path: ``torch.compile`` of a model's UNet for the calls that need no gradient.

`CompiledUNet(unet, mode)` wraps the module (the same parameters, nothing copied); `LatentDiffusion.compile(mode)`
puts one on a model and `LatentDiffusion._unet` calls it whenever autograd is off, which is every sampling loop
(invert, decode, edit, generate). Calls with gradients (null-text inversion's and ReNoise's inner optimisation,
training) stay eager.

- **Modes.** ``auto`` is ``reduce-overhead`` (inductor + CUDA graphs) on CUDA and `CPU_MODE` on a CPU (what measured
  fastest there, docs/RESULTS.md §4); any `torch.compile` mode may be named. ``reduce-overhead`` replays CUDA graphs:
  each call starts a new graph generation (`torch.compiler.cudagraph_mark_step_begin`) and its output is cloned out of
  the graph's memory pool, so a sampler may keep it across calls. CUDA-graph trees are per thread: a caller that
  runs the model from several threads (the web page's worker threads) should name a mode without CUDA graphs.
- **Static shapes, no recompile while timed.** Each batch shape compiles once (``dynamic=False``), and so does each
  state of an attention controller that changes the computation (P2P's cross / self control on or off): the
  controllers read booleans set once per step, never the step number, and build their index tensors before the
  loop (`icd.editing.controllers.Controller.prepare`), so an edit of N steps compiles at most a handful of graphs and
  a second edit of the same shapes compiles none. The recompile limit is raised to `RECOMPILE_LIMIT` so that these
  variants (and a second UNet: the baselines') compile instead of falling back to eager.
- **Fused adapters.** `icd.models.lora.FusedAdapters` swaps the adapted weights by pointer (``weight.data``); the
  compiled graphs take the parameters as inputs, so a swap neither recompiles nor changes a graph (tested). Under CUDA
  graphs a weight set whose addresses a recorded graph has not seen is recorded once more (torch does not count
  parameter re-records against its limit); after one warm-up edit both adapters' graphs exist.
"""

from __future__ import annotations

import torch

MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
CPU_MODE = "default"  # CPU proxy: 1.22x vs max-autotune-no-cudagraphs' 1.23x, compiled faster (docs/RESULTS.md §4)
RECOMPILE_LIMIT = 64  # graphs per compiled function: batch shapes x controller states x UNets (torch's default is 8)


def resolve_mode(mode: str | bool | None, device: torch.device | str) -> str | None:
    """The `torch.compile` mode of `mode` on `device`: None / False / "none" -> None (eager); True / "auto" -> the
    device's default (see the module docstring); a named mode as is. ValueError for an unknown name."""
    if mode is None or mode is False or mode == "none":
        return None
    if mode is True or mode == "auto":
        return "reduce-overhead" if torch.device(device).type == "cuda" else CPU_MODE
    if mode not in MODES:
        raise ValueError(f"unknown compile mode {mode!r} (--compile): use {', '.join(MODES)}")
    return mode


def raise_recompile_limits(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo keep up to `limit` graphs per function (never lowers a limit already higher)."""
    import torch._dynamo  # the compiler: only once compilation is asked for

    config = torch._dynamo.config
    keys = ("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit") else (
        "cache_size_limit", "accumulated_cache_size_limit")  # torch < 2.6's names
    for key in keys:
        if hasattr(config, key):
            setattr(config, key, max(getattr(config, key), limit))


class CompiledUNet:
    """`unet` under ``torch.compile(mode=mode, dynamic=False)``; calling it returns the UNet's ``.sample``."""

    def __init__(self, unet, mode: str, *, backend: str = "inductor"):
        raise_recompile_limits()
        self.unet, self.mode, self.backend = unet, mode, backend
        self.cuda_graphs = backend == "inductor" and mode in CUDA_GRAPH_MODES and next(
            unet.parameters()).device.type == "cuda"
        kwargs = {"mode": mode} if backend == "inductor" and mode != "default" else {}
        self.fn = torch.compile(unet, backend=backend, dynamic=False, **kwargs)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are the caller's (cloned)
            return self.fn(*args, **kwargs).sample.clone()
        return self.fn(*args, **kwargs).sample


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (tests and benchmarks read the difference)."""
    from torch._dynamo.utils import counters  # the compiler's counters: only where compilation was asked for

    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    """Graph breaks dynamo has met in this process so far (each reason counted)."""
    from torch._dynamo.utils import counters  # as above

    return int(sum(counters["graph_break"].values()))
