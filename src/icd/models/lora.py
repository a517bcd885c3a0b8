"""The two iCD LoRA adapters on one frozen UNet: add, switch, save and load (docs/method.md §5.5).

- Adapter names are ``rev_cd`` (reverse, noise -> image) and ``fwd_cd`` (forward, image -> noise); peft rejects
  ``forward`` as a name.
- The teacher is the same UNet with adapters disabled (`use(unet, None)`), so no second copy exists.
- peft's `set_adapter` turns ``requires_grad`` off on the inactive adapter; a graph that runs both adapters would then
  silently give the first one no gradient. `use(..., trainable=True)` therefore re-enables gradients on every LoRA
  parameter after each switch.
- Each adapter is saved to its own safetensors file (peft key format) next to a JSON config.
- `FusedAdapters` (inference): each adapter folded into a copy of the base weights and peft's wrappers taken out of
  the forward, so a step is one plain UNet call; the weights are swapped once per phase (invert, decode), never per
  call, and a swap computes nothing.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file

from icd.io import file_problem, read_json, save_safetensors_atomic, write_text_atomic

REVERSE = "rev_cd"
FORWARD = "fwd_cd"
ADAPTERS = (REVERSE, FORWARD)
LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


REVERSES = ("adapter", "model")  # what decodes: the reverse adapter, or the model's own network (`adapter_names`)


def names_for(reverse: str) -> tuple[str, ...]:
    """The adapters a network carries when `reverse` decodes: both, or only the forward one for ``"model"`` (the
    model's own network is the reverse model: a few-step generator such as FLUX.1-schnell)."""
    if reverse not in REVERSES:
        raise ValueError(f"\"reverse\" must be one of {', '.join(REVERSES)}, got {reverse!r}")
    return ADAPTERS if reverse == "adapter" else (FORWARD,)


def adapter_names(meta: dict) -> tuple[str, ...]:
    """The adapters an ``adapters.json`` has files for (`names_for` its ``"reverse"``, default ``"adapter"``)."""
    return names_for(meta.get("reverse", "adapter"))


def add_adapters(unet, *, rank: int = 64, alpha: int = 8, targets: Sequence[str] = LORA_TARGETS,
                 names: Sequence[str] = ADAPTERS, seed: int = 0) -> None:
    """Add one LoRA adapter per name (same rank/alpha/targets); base weights are frozen."""
    unet.requires_grad_(False)
    for name in names:
        # F alone draws as it does beside R
        torch.manual_seed(seed + (ADAPTERS.index(name) if name in ADAPTERS else names.index(name)))
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
        with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`")
            unet.add_adapter(config, adapter_name=name)
    set_trainable(unet, names)


def has_adapters(unet) -> bool:
    """True when peft adapters are attached to `unet`."""
    return bool(getattr(unet, "peft_config", None))


def named_lora_parameters(unet, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The LoRA A and B matrices of the adapters `names`, under the network's own parameter names."""
    wanted = tuple(f".{name}.weight" for name in names)
    return {n: p for n, p in unet.named_parameters() if ".lora_" in n and n.endswith(wanted)}


def lora_parameters(unet, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter `name` (LoRA A and B matrices)."""
    return list(named_lora_parameters(unet, (name,)).values())


def set_trainable(unet, names: Sequence[str]) -> None:
    for name in names:
        for p in lora_parameters(unet, name):
            p.requires_grad_(True)


def use(unet, name: str | None, *, trainable: Sequence[str] = ()) -> None:
    """Activate adapter `name` (None: the teacher, adapters disabled); keep `trainable` adapters trainable."""
    if name is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(name)
    set_trainable(unet, trainable)


def adapter_state_dict(unet, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=name).items()}


def save_adapters(unet, directory: str | Path, metadata: dict, names: Sequence[str] = ADAPTERS) -> dict[str, Path]:
    """Write ``<name>.safetensors`` per adapter and ``adapters.json`` (metadata + file names), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in names:
        files[name] = save_safetensors_atomic(adapter_state_dict(unet, name), directory / f"{name}.safetensors",
                                              metadata={"adapter": name})
    write_text_atomic(directory / "adapters.json",
                      json.dumps({**metadata, "files": {n: p.name for n, p in files.items()}}, indent=1) + "\n")
    return files


def adapters_meta(directory: str | Path, names: Sequence[str] | None = None) -> dict:
    """The checked ``adapters.json`` of an adapters folder: ValueError naming the file and what is wrong (not a
    regular file, not UTF-8 JSON, a missing or malformed ``files`` / ``rank`` / ``alpha``, a named file missing).
    names: the adapters it must have (default: those it declares, `adapter_names`)."""
    meta_file = Path(directory) / "adapters.json"
    problem = file_problem(meta_file)  # a FIFO is refused before it is opened: reading it would block
    if problem:
        raise ValueError(f"{meta_file}: {problem}")
    try:
        meta = read_json(meta_file)
    except ValueError as e:
        raise ValueError(f"{meta_file}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_file}: expected a JSON object, got {type(meta).__name__}")
    if names is None:
        try:
            names = adapter_names(meta)
        except ValueError as e:
            raise ValueError(f"{meta_file}: {e}") from None
    files = meta.get("files")
    if not isinstance(files, dict) or any(not isinstance(files.get(n), str) for n in names):
        raise ValueError(f"{meta_file}: \"files\" must name the file of each adapter ({', '.join(names)}), "
                         f"got {files!r}")
    for key in ("rank", "alpha"):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 1):
            raise ValueError(f"{meta_file}: \"{key}\" must be a positive integer, got {meta[key]!r}")
    for name in names:
        problem = file_problem(Path(directory) / files[name])
        if problem:
            raise ValueError(f"adapter {name}: {Path(directory) / files[name]} is {problem}")
    return meta


def load_adapters(unet, directory: str | Path, names: Sequence[str] | None = None) -> dict:
    """Load adapters saved by `save_adapters` into a UNet that has them (e.g. after `add_adapters`); names: default
    those the folder declares (`adapter_names`)."""
    directory = Path(directory)
    meta = adapters_meta(directory, names)
    names = adapter_names(meta) if names is None else names
    for name in names:
        path = directory / meta["files"][name]
        try:
            state = load_file(str(path))
        except (OSError, ValueError, SafetensorError) as e:
            raise ValueError(f"adapter {name}: cannot read {path} ({str(e).strip() or type(e).__name__})") from None
        try:
            result = set_peft_model_state_dict(unet, state, adapter_name=name)
        except RuntimeError as e:  # a shape mismatch: another rank or another UNet
            first = str(e).strip().splitlines()
            raise ValueError(f"adapter {name}: {path} does not fit this UNet (another rank or model?): "
                             f"{first[-1].strip() if first else type(e).__name__}") from None
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter {name}: unexpected keys for this UNet, e.g. {unexpected[:3]}")
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k]
        if missing:
            raise ValueError(f"adapter {name}: the file lacks {len(missing)} LoRA weights, e.g. {missing[:2]}")
    return meta


def attach_adapters(unet, directory: str | Path) -> dict:
    """Add the folder's adapters (both, or the forward one alone: `adapter_names`) with the rank, alpha and target
    modules recorded in ``adapters.json`` (targets: the UNet's `LORA_TARGETS` where it records none) and load their
    weights."""
    meta = adapters_meta(directory)
    add_adapters(unet, rank=int(meta.get("rank", 64)), alpha=int(meta.get("alpha", 8)),
                 targets=tuple(meta.get("targets", LORA_TARGETS)), names=adapter_names(meta))
    load_adapters(unet, directory)
    unet.requires_grad_(False)
    return meta


class AdapterWeights(torch.nn.Module):
    """The LoRA weights of `unet`'s adapters `names` as one checkpointable module (a training run's checkpoint holds
    them alone, never the frozen network: a FLUX.1 transformer would add 48 GB per checkpoint, and a sharded one
    cannot be saved whole by one process). Its state dict is those parameters under the network's own names; loading
    copies into them in place, and takes a whole-network state dict too (checkpoints written before: its other
    entries are ignored)."""

    def __init__(self, unet, names: Sequence[str] = ADAPTERS):
        super().__init__()
        # a plain dict, not a submodule: the parameters stay the network's (no second registration, no copy)
        self.__dict__["params"] = named_lora_parameters(unet, names)
        if not self.params:
            raise ValueError(f"the network carries no LoRA weights of {', '.join(names)}")

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.params.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False) -> None:
        missing = [n for n in self.params if n not in state]
        if missing:
            raise RuntimeError(f"the checkpoint lacks {len(missing)} LoRA weights, e.g. {missing[:2]}")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state[n])


class FusedAdapters:
    """Inference with each adapter folded into the weights it modifies: W_a = W + scale_a * B_a A_a.

    A LoRA-carrying UNet call runs every targeted layer twice (base and low-rank branch) behind peft's wrapper logic;
    on small UNets, and at batch 1-2 on a GPU, that host overhead dominates. Fused, every wrapper runs its base
    layer's own forward (peft's code and the LoRA branches leave the forward; the module tree, its parameter names and
    the LoRA weights stay, so fingerprints and saved adapters read the same), and a call costs what the base UNet
    costs. `activate(name)` points each targeted layer at the weights of `name` (None: the original weights) when
    `name` is not already active: one pointer swap per phase (an inversion runs the forward adapter, a decode the
    reverse one), a no-op on every other call; nothing is recomputed, so switching never accumulates rounding
    (unlike merge / unmerge in place). `release()` gives the UNet back to peft (base weights, wrappers' forwards).

    Memory: one extra copy of the targeted weights per adapter -- the same as two fused UNets sharing every
    non-adapted module (`benchmarks/sd_shaped_timing.py --memory` counts them for a family's config). The result
    equals the unfused call up to float rounding. Training must not use it (the LoRA parameters get no gradient
    through fused weights).
    """

    def __init__(self, unet, names: Sequence[str] = ADAPTERS):
        self.unet = unet
        self.layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ValueError("this UNet carries no LoRA adapters to fuse")
        self._params = [layer.get_base_layer().weight for layer in self.layers]  # found once: a swap only points
        base = [p.data for p in self._params]
        self.weights: dict[str | None, list[torch.Tensor]] = {None: base}
        with torch.no_grad():
            for name in names:
                self.weights[name] = [(w.float() + layer.get_delta_weight(name).float()).to(w.dtype)
                                      for layer, w in zip(self.layers, base)]
        for layer in self.layers:  # peft's wrapper out of the forward: the module runs its base layer's forward
            layer.forward = layer.get_base_layer().forward
        self.active: str | None = None
        self.swaps = 0  # weight swaps so far (one per phase; tests read it)
        self._point(None)

    def activate(self, name: str | None) -> None:
        """Make `name`'s weights the UNet's (None: the original ones); free when they already are."""
        if name == self.active:
            return
        if name not in self.weights:
            raise ValueError(f"no fused adapter {name!r}; have {', '.join(n for n in self.weights if n)}")
        self._point(name)

    def refresh(self) -> None:
        """Point the layers at the active adapter's tensors again (after `weights` were replaced, e.g. re-laid out)."""
        self._point(self.active)

    def release(self) -> None:
        """Back to peft: original weights, each wrapper's own forward (its LoRA branches as peft left them)."""
        self._point(None)
        for layer in self.layers:
            layer.__dict__.pop("forward", None)

    def _point(self, name: str | None) -> None:
        for p, w in zip(self._params, self.weights[name]):
            p.data = w
        self.active = name
        self.swaps += 1


def fused_memory(unet, targets: Sequence[str] = LORA_TARGETS, *, rank: int = 64, adapters: int = 2,
                 bytes_per_param: int = 2) -> dict[str, int]:
    """Bytes of a UNet's weights at inference under each way of holding `adapters` fused adapters (counted from its
    parameters; a UNet on the ``meta`` device works): ``base`` (the UNet alone), ``adapted`` (the weights the
    adapters modify, once), ``lora`` (the LoRA factors of all adapters), and the layouts ``fused_unets`` (two fused
    UNets sharing every non-adapted module, beside the original weights: base + adapters x adapted),
    ``fused_copies`` (`FusedAdapters`: one UNet whose adapted weights are swapped by pointer per phase, the LoRA
    factors kept: fused_unets + lora), ``refuse_per_phase`` (one fused buffer recomputed from the factors at each
    swap: base + adapted + lora) and ``peft`` (wrappers in the forward: base + lora)."""
    adapted = lora_params = 0
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        adapted += weight.numel()
        fan_in = weight[0].numel()
        lora_params += adapters * rank * (fan_in + weight.shape[0])
    base = sum(p.numel() for p in unet.parameters())
    b = bytes_per_param
    return {"base": base * b, "adapted": adapted * b, "lora": lora_params * b,
            "fused_unets": (base + adapters * adapted) * b,
            "fused_copies": (base + adapters * adapted + lora_params) * b,
            "refuse_per_phase": (base + adapted + lora_params) * b,
            "peft": (base + lora_params) * b}


def truncate_rank(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """An adapter's LoRA pairs cut to `rank` by SVD: each product B A (the layer's delta up to the scale
    alpha / r) becomes U_k S_k V_k^T, its best rank-k approximation (Eckart–Young), split as B' = U_k S_k^½ and
    A' = S_k^½ V_k^T. Linear and conv LoRA pairs alike (A: [r, in, ...], B: [out, r, ...]). Keep the scale
    unchanged by saving with alpha' = alpha · rank / r. Used to fit a higher-rank adapter into a size budget."""
    out = dict(state)
    for key_a in [k for k in state if ".lora_A." in k]:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        a, b = state[key_a], state[key_b]
        r = a.shape[0]
        if rank >= r:
            raise ValueError(f"truncate_rank: target rank {rank} is not below the adapter's rank {r}")
        delta = b.reshape(b.shape[0], r).double() @ a.reshape(r, -1).double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        out[key_b] = (u[:, :rank] * root).reshape(b.shape[0], rank, *b.shape[2:]).to(b.dtype).contiguous()
        out[key_a] = (root[:, None] * vh[:rank]).reshape(rank, *a.shape[1:]).to(a.dtype).contiguous()
    return out


def truncated_metadata(meta: dict, rank: int) -> dict:
    """``adapters.json`` metadata after `truncate_rank` to `rank`: alpha scales with the rank (alpha / rank, the
    LoRA scale, is unchanged); the trained rank and alpha are kept. Raises ValueError for an unusable rank."""
    if not 0 < rank < meta["rank"] or meta["alpha"] * rank % meta["rank"]:
        raise ValueError(f"rank {rank}: needs 0 < rank < {meta['rank']} with alpha {meta['alpha']} * rank "
                         f"divisible by {meta['rank']}")
    return {**meta, "trained_rank": meta["rank"], "trained_alpha": meta["alpha"],
            "rank": rank, "alpha": meta["alpha"] * rank // meta["rank"]}


def copy_adapters(src: str | Path, dst: str | Path, *, rank: int | None = None,
                  dtype: torch.dtype | None = None, metadata: dict | None = None) -> dict:
    """Copy the adapters folder `src` to `dst`, both adapters cut to `rank` (`truncate_rank`; ``adapters.json`` then
    records the new rank, alpha scaled with it and the trained rank and alpha) and cast to `dtype` where given;
    `metadata` entries replace the source's (a shipped copy records the ``teacher`` it sits on). Returns the written
    metadata."""
    src, dst = Path(src), Path(dst)
    meta = json.loads((src / "adapters.json").read_text())
    if rank is not None:
        meta = truncated_metadata(meta, rank)
    meta |= metadata or {}
    dst.mkdir(parents=True, exist_ok=True)
    for name, file in meta["files"].items():
        state = load_file(str(src / file))
        if rank is not None:
            state = truncate_rank(state, rank)
        if dtype is not None:
            state = {k: v.to(dtype).contiguous() for k, v in state.items()}
        save_safetensors_atomic(state, dst / file, metadata={"adapter": name})
    write_text_atomic(dst / "adapters.json", json.dumps(meta, indent=1) + "\n")
    return meta
