"""Memory for the big flow models (FLUX.1, SD3.5; docs/flow-models.md): what a pipeline folder's weights take,
whether a load fits the device, and CPU offload of a loaded model's components.

- `folder_bytes(path, dtype)`: the bytes of each component at `dtype`, read from the safetensors headers only (no
  tensor is loaded): the text encoders, the VAE, the network (``transformer`` / ``unet``; on the iCD path its
  guidance-distilled subfolder) and the iCD adapters (``icd/``, with their fused copies when `fuse`). A sharded
  component (``*.safetensors.index.json``) counts every shard. Floating-point tensors count at `dtype` (the loaders
  cast them to it); others (integer ids) at their own width.
- `check_fits(path, device, dtype, offload)`: before any weight loads, `ModelError` in one line for a load that
  cannot fit, naming the model, the bytes needed, the bytes free and the option that would fit. What must fit:
  on CUDA, free GPU memory (``torch.cuda.mem_get_info``) must hold the weights that sit on the GPU at once -- every
  weight (``none``), the largest component (``model``), the largest submodule (``sequential``) -- plus
  `ACTIVATION_MARGIN` (15 %) of them for activations (a rule of thumb, not measured: large images need more); and
  RAM must hold every weight, since the loader reads them into RAM before moving them (and ``model`` /
  ``sequential`` keep them there). On a CPU, available RAM (``MemAvailable``) must hold every weight + 15 %, whatever
  the offload (it moves weights off a GPU only). Other devices (MPS) are not checked.
- `apply_offload(model, mode, device)`: ``model`` keeps each component (text encoders, network, VAE) on the CPU and
  moves it to `device` for its own calls, moving every other component of the model back first, so one component
  sits on the device at a time (accelerate's `CpuOffload` hook); ``sequential`` runs accelerate's `cpu_offload` on
  each component (each submodule's weights reach the device only for its own call: least memory, slowest). The model
  reports `device` as its ``execution_device``, where latents and inputs are made. Fused iCD adapters are unfused
  first (their weight copies would not follow the offload).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path

import torch
from accelerate import cpu_offload
from accelerate.hooks import CpuOffload, add_hook_to_module

from icd.models.base import LatentDiffusion
from icd.models.loading import ADAPTERS_SUBFOLDER, ModelError, family_of_folder, guidance_subfolder

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")
ACTIVATION_MARGIN = 0.15  # room on the computing device for activations, as a fraction of the weights there
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "vae")  # a model's modules, in call order
SEPARATE = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")  # components apart from the network
FUSED = "icd-fused"  # folder_bytes' key of the fused adapters' weight copies (`icd.models.lora.FusedAdapters`)
MAX_HEADER = 100 * 2**20  # the safetensors format's limit on a header
_WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
          "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}

__all__ = ["ACTIVATION_MARGIN", "OFFLOAD_MODES", "apply_offload", "check_fits", "folder_bytes", "format_bytes",
           "offload_mode"]


# ---------------------------------------------------------------------------------------------- weights' bytes
def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON): names -> dtype, shape."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelError(f"{file}: not a readable safetensors file ({str(e).strip() or type(e).__name__})") from None
    header.pop("__metadata__", None)
    return header


def _tensor_bytes(info: dict, dtype: torch.dtype) -> int:
    """One tensor's bytes once loaded: a floating-point one at `dtype`, another at its own width."""
    kind = info["dtype"]
    width = dtype.itemsize if kind.startswith(("F", "BF")) else _WIDTH.get(kind, 1)
    n = 1
    for d in info["shape"]:
        n *= int(d)
    return n * width


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a component folder's weights load from, each once: the shards of each index and every
    other single file (a guidance embedder beside the transformer), else, where the folder has only a variant
    (``*.fp16.safetensors``), the same for it."""
    def shards(index: Path) -> set[Path]:
        try:
            return {folder / f for f in json.loads(index.read_text())["weight_map"].values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a readable weights index ({type(e).__name__})") from None

    for pattern, single in (("*.safetensors.index.json", r"[^.]+"), ("*.safetensors.index.*.json", r"[^.]+\.[^.]+")):
        files, stems = set(), set()
        for index in sorted(folder.glob(pattern)):
            files |= shards(index)
            stems.add(index.name.partition(".")[0])
        for p in sorted(folder.glob("*.safetensors")):
            stem = p.name.removesuffix(".safetensors")
            if re.fullmatch(single, stem) and "-of-" not in stem and stem.partition(".")[0] not in stems:
                files.add(p)
                stems.add(stem.partition(".")[0])
        if files:
            return sorted(files)
    return []


def _headers(files: list[Path]) -> dict[str, dict]:
    return {k: v for f in files for k, v in safetensors_header(f).items()}


def _largest_module(headers: dict[str, dict], dtype: torch.dtype) -> int:
    """The bytes of the largest module holding weights directly (tensors grouped by their name's parent): what
    sequential offload puts on the device at once."""
    modules: dict[str, int] = {}
    for name, info in headers.items():
        parent = name.rpartition(".")[0]
        modules[parent] = modules.get(parent, 0) + _tensor_bytes(info, dtype)
    return max(modules.values(), default=0)


def _components(path: Path, *, icd: bool) -> list[str]:
    """The folder's components that a load reads (`SEPARATE` where present; T5 of SD3 with its tokenizer, as
    `icd.models.sd3.load`) and the network: the family's own, or on the iCD path its guidance-distilled subfolder."""
    family = family_of_folder(path)
    names = [c for c in SEPARATE if (path / c).is_dir() and weight_files(path / c)
             and (c != "text_encoder_3" or (path / "tokenizer_3").is_dir())]
    network = guidance_subfolder(path) if icd else family.DENOISER
    if not (path / network).is_dir():  # a distilled network given elsewhere (--unet): the folder's as its stand-in
        network = family.DENOISER
    return names + [network]


def _adapter_bytes(folder: Path, dtype: torch.dtype) -> tuple[int, int]:
    """(the LoRA factors of every adapter file in `folder`, the weights they adapt once) in bytes at `dtype`."""
    try:
        files = json.loads((folder / "adapters.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0
    factors, adapted = 0, 0
    for i, name in enumerate(sorted(files.values())):
        header = safetensors_header(folder / name)
        factors += sum(_tensor_bytes(v, dtype) for v in header.values())
        if i:
            continue
        for key, a in header.items():  # W [out, in, ...] of each pair A [r, in, ...], B [out, r, ...]
            b = header.get(key.replace(".lora_A.", ".lora_B."))
            if ".lora_A." in key and b is not None:
                shape = [b["shape"][0], *a["shape"][1:]]
                adapted += _tensor_bytes({"dtype": a["dtype"], "shape": shape}, dtype)
    return factors, adapted


def folder_bytes(path: str | Path, dtype: torch.dtype, *, icd: bool = False, adapters: str | Path | None = None,
                 fuse: bool = False) -> dict[str, int]:
    """Bytes per component of the weights a load of the pipeline folder `path` reads, at `dtype` (module docstring).
    Keys: the components' subfolder names (``text_encoder``, ``vae``, ``transformer`` ...), the network's under its
    subfolder's name; with `icd` the network is the guidance-distilled one and ``icd`` counts the adapters' LoRA
    factors (`adapters`, default ``<path>/icd``), and with `fuse` also ``icd-fused``: the fused copies of the weights
    the adapters modify, one per adapter (`icd.models.lora.FusedAdapters`)."""
    path = Path(path)
    out = {c: sum(_tensor_bytes(v, dtype) for v in _headers(weight_files(path / c)).values())
           for c in _components(path, icd=icd)}
    if icd:
        folder = Path(adapters) if adapters is not None else path / ADAPTERS_SUBFOLDER
        factors, adapted = _adapter_bytes(folder, dtype)
        if factors:
            out[ADAPTERS_SUBFOLDER] = factors
            if fuse:
                out[FUSED] = 2 * adapted
    return out


# ---------------------------------------------------------------------------------------------- does it fit
def format_bytes(n: int) -> str:
    """Bytes in GiB (1 decimal), MiB below 1 GiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_ram() -> int:
    """Bytes of RAM available to a new allocation: ``MemAvailable`` of /proc/meminfo, else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cuda_free(device: torch.device) -> int:
    """Free bytes on a CUDA device, as the driver reports them (other processes' use counted)."""
    return int(torch.cuda.mem_get_info(device)[0])


def device_bytes(path: str | Path, dtype: torch.dtype, offload: str = "none", *, icd: bool = False,
                 adapters: str | Path | None = None, fuse: bool = False) -> int:
    """The weights on the computing device at once under `offload`: every one (``none``), the largest component
    (``model``; the network counted with its adapters), the largest submodule (``sequential``). Offloading unfuses
    (`apply_offload`), so `fuse` counts with ``none`` only."""
    parts = folder_bytes(path, dtype, icd=icd, adapters=adapters, fuse=fuse and offload == "none")
    if offload == "none":
        return sum(parts.values())
    if offload == "model":
        network = sum(v for k, v in parts.items() if k not in SEPARATE)
        return max([network] + [v for k, v in parts.items() if k in SEPARATE])
    return max((_largest_module(_headers(weight_files(Path(path) / c)), dtype)
                for c in _components(Path(path), icd=icd)), default=0)


def _with_margin(n: int) -> int:
    return int(n * (1 + ACTIVATION_MARGIN))


def check_fits(path: str | Path, device: str | torch.device, dtype: torch.dtype, offload: str = "none", *,
               icd: bool = False, adapters: str | Path | None = None, fuse: bool = False,
               name: str | None = None) -> None:
    """`ModelError` (one line) when loading the folder `path` at `dtype` on `device` with `offload` cannot fit
    (module docstring); `icd`, `adapters`, `fuse` as `folder_bytes`; `name`: the model as the user named it."""
    if offload not in OFFLOAD_MODES:
        raise ModelError(f"unknown offload {offload!r}: use {', '.join(OFFLOAD_MODES)}")
    path, device = Path(path), torch.device(device)
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        return  # MPS and others: not checked; CUDA missing: the load reports it
    name, kind = name or str(path), str(dtype).removeprefix("torch.")
    options = {"icd": icd, "adapters": adapters, "fuse": fuse}
    total, ram = device_bytes(path, dtype, **options), available_ram()
    margin = f"+ {ACTIVATION_MARGIN:.0%} for activations"
    if device.type == "cpu":
        if _with_margin(total) > ram:
            gpu = _with_margin(device_bytes(path, dtype, "model", **options))
            raise ModelError(f"{name} needs {format_bytes(_with_margin(total))} of RAM on the CPU ({kind} weights "
                             f"{format_bytes(total)} {margin}) but {format_bytes(ram)} is available; --offload does "
                             f"not help on a CPU (it moves weights off a GPU): free memory, or use a GPU (--device "
                             f"cuda --offload model needs {format_bytes(gpu)} of GPU memory)")
        return
    held = device_bytes(path, dtype, icd=icd, adapters=adapters)  # in RAM: the fused copies are made on the GPU
    if held > ram:  # the loader reads every weight into RAM before moving it; offload keeps them there
        half = ""
        if dtype.itemsize > 2 and device_bytes(path, torch.bfloat16, icd=icd, adapters=adapters) <= ram:
            half = ", or use --dtype bf16"
        raise ModelError(f"{name}: its {kind} weights take {format_bytes(held)} of RAM while they load (and stay "
                         f"there with --offload) but {format_bytes(ram)} is available: free memory{half}")
    free = cuda_free(device)
    weights = device_bytes(path, dtype, offload, **options)
    if _with_margin(weights) <= free:
        return
    what = {"none": "weights", "model": "largest component", "sequential": "largest submodule"}[offload]
    raise ModelError(f"{name} needs {format_bytes(_with_margin(weights))} on {device} ({kind} {what} "
                     f"{format_bytes(weights)} {margin}) but {format_bytes(free)} is free; "
                     f"{_advice(path, dtype, offload, free, **options)}")


def _advice(path: Path, dtype: torch.dtype, offload: str, free: int, **options) -> str:
    """The first option that fits `free`: bf16 at this offload (from fp32), more offload at this dtype, more offload
    in bf16; else what the least would need."""
    later = OFFLOAD_MODES[OFFLOAD_MODES.index(offload) + 1:]
    half = dtype.itemsize > 2
    tries = [(offload, torch.bfloat16)] * half + [(m, dtype) for m in later]
    tries += [(m, torch.bfloat16) for m in later] * half
    for mode, d in tries:
        need = _with_margin(device_bytes(path, d, mode, **options))
        if need <= free:
            flags = ([] if d == dtype else ["--dtype bf16"]) + ([] if mode == offload else [f"--offload {mode}"])
            return f"use {' '.join(flags)} (needs {format_bytes(need)} on the GPU at once)"
    least = _with_margin(device_bytes(path, torch.bfloat16 if half else dtype, "sequential", **options))
    return (f"even --offload sequential{' --dtype bf16' * half} needs {format_bytes(least)}: free GPU memory or use "
            "a larger GPU")


# ---------------------------------------------------------------------------------------------- offload
class OneAtATime(CpuOffload):
    """accelerate's `CpuOffload` hook (the module goes to the device when called and stays there) that first moves
    every other module of its group back to the CPU: one component of a model on the device at a time, whatever
    order the methods call them in (encode_images before encode_prompt, an empty prompt encoded inside a loop)."""

    def __init__(self, execution_device: torch.device, group: list[torch.nn.Module]):
        super().__init__(execution_device=execution_device)
        self.group = group  # shared by the hooks of one model (and of its `with_unet` copies)

    def pre_forward(self, module, *args, **kwargs):
        moved = False
        for other in self.group:
            if other is not module and _device_of(other).type != "cpu":
                other.to("cpu")
                moved = True
        if moved and self.execution_device.type == "cuda":
            torch.cuda.empty_cache()
        return super().pre_forward(module, *args, **kwargs)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _execution_device(device: str | torch.device) -> torch.device:
    """`device` with its index (``cuda`` -> ``cuda:N``, the current one), as a module's parameters report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def offload_mode(model: LatentDiffusion) -> str:
    """The offload of `model`'s network: ``model``, ``sequential`` or ``none`` (read from its accelerate hook)."""
    hook = getattr(model.unet, "_hf_hook", None)
    return "model" if isinstance(hook, OneAtATime) else "sequential" if hook is not None else "none"


def apply_offload(model: LatentDiffusion, mode: str, device: str | torch.device) -> LatentDiffusion:
    """Offload `model`'s components (`COMPONENTS`) between calls with `mode` (module docstring), computing on
    `device`; ``none`` leaves it as it is. A component hooked already (shared with the model a `with_unet` copy came
    from) keeps its hook, and a new network joins its group. Returns `model`."""
    if mode not in OFFLOAD_MODES:
        raise ModelError(f"unknown offload {mode!r}: use {', '.join(OFFLOAD_MODES)}")
    if mode == "none":
        return model
    if model.compiled is not None:
        raise ModelError("--offload cannot be combined with --compile (compiled graphs hold the weights' addresses)")
    device = _execution_device(device)
    if model.fused is not None:  # the fused copies are plain tensors: a module's move would leave them behind
        model.fused.release()
        model.fused = None
        log.info("offload: iCD adapters unfused (peft's LoRA branches run in each call)")
    modules = [m for m in (getattr(model, a, None) for a in COMPONENTS) if m is not None]
    if mode == "model":
        hooked = [m._hf_hook for m in modules if isinstance(getattr(m, "_hf_hook", None), OneAtATime)]
        group = hooked[0].group if hooked else []
        for m in modules:
            if not hasattr(m, "_hf_hook"):
                group.append(m)
                add_hook_to_module(m, OneAtATime(device, group), append=True)  # init_hook: to the CPU
    else:
        for m in modules:
            if not hasattr(m, "_hf_hook"):  # as diffusers' enable_sequential_cpu_offload
                cpu_offload(m.to("cpu"), execution_device=device, offload_buffers=len(m._parameters) > 0)
            elif isinstance(m._hf_hook, OneAtATime):
                raise ModelError("a component is offloaded already with --offload model")
    model.execution_device = device  # where latents and inputs are made (`LatentDiffusion.device`)
    return model


def stored_value(module: torch.nn.Module, name: str, p: torch.Tensor) -> torch.Tensor:
    """The values of `module`'s parameter `name` (`p`): `p` itself, or where sequential offload left it on the meta
    device, the CPU tensor its accelerate hook copies to the device for each call."""
    if not p.is_meta:
        return p
    owner, _, leaf = name.rpartition(".")
    hook = getattr(module.get_submodule(owner), "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None:
        raise ValueError(f"parameter {name} is on the meta device without an offload hook holding its values")
    return weights[leaf]
