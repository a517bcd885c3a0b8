"""The authors' released iCD LoRA files: read them onto our UNet as the two adapters, and write ours in their format.

The released files (docs/stable-diffusion.md) are safetensors with peft keys
``unet.base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` and no alpha: the authors' loader uses
alpha 8 whatever the rank (64 in their files), so the scale of every delta is 8 / rank. One file per direction; the
boundaries are in the file name, as the *input* times of that direction:

- ``forward-19-259-519-779.safetensors`` (also ``icd-sd15-forward-19-259-519-779``,
  ``iCD-SD15-forward_19_259_519_779``): encoding 19 -> 259 -> 519 -> 779 -> 999, so E_F = (259, 519, 779, 999);
- ``reverse-259-519-779-999.safetensors``: decoding 999 -> 779 -> 519 -> 259 -> 0, so E_R = (0, 259, 519, 779).

`load_released` checks every key against the UNet before anything is attached: a key naming no module, a LoRA
shape that does not fit the module, mixed ranks, or a forward file passed as reverse all raise `ReleasedLoraError`
naming the file and the first bad key.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError
from safetensors.torch import load_file

from icd.boundaries import Boundaries
from icd.io import save_safetensors_atomic
from icd.models import lora

PREFIX = "unet.base_model.model."
RELEASED_ALPHA = 8  # the authors' loader: alpha 8 for every module, whatever the rank
DIRECTIONS = {lora.FORWARD: "forward", lora.REVERSE: "reverse"}
_NAME = re.compile(r"(forward|reverse)[-_]((?:\d+[-_])*\d+)", re.IGNORECASE)


class ReleasedLoraError(ValueError):
    """A LoRA file that does not fit the model (keys, shapes, direction, boundaries)."""


def boundaries_from_name(path: str | Path) -> tuple[str, Boundaries] | None:
    """(direction, boundaries) from a released file name, or None when the name carries none.

    forward-<start>-<E_F[:-1]...>: encoding starts at `start` and ends at 999; reverse-<E_R[1:]...>-999."""
    match = _NAME.search(Path(path).stem)
    if match is None:
        return None
    direction = match.group(1).lower()
    times = [int(v) for v in re.split(r"[-_]", match.group(2))]
    try:
        if direction == "forward":
            start, *inner = times
            return direction, Boundaries(reverse=(0, *inner), forward=(*inner, 999), start=start)
        *inner, last = times
        if last != 999:
            raise ValueError(f"a reverse file's last input time must be 999, got {last}")
        return direction, Boundaries(reverse=(0, *inner), forward=(*inner, 999))
    except ValueError as e:
        raise ReleasedLoraError(f"{path}: the times in its name are not a boundary set ({e})") from None


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `path` with the released prefix removed (keys ``<module>.lora_A.weight``)."""
    path = Path(path)
    if not path.is_file():
        raise ReleasedLoraError(f"LoRA file not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ReleasedLoraError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    out = {}
    for key, value in state.items():
        short = key.removeprefix(PREFIX)
        if not re.search(r"\.lora_[AB]\.weight$", short):
            raise ReleasedLoraError(f"{path}: {key!r} is not a LoRA weight (expected <module>.lora_A.weight / "
                                    ".lora_B.weight)")
        out[short] = value
    if not out:
        raise ReleasedLoraError(f"{path}: holds no LoRA weights")
    return out


def check_state(unet, state: dict[str, torch.Tensor], path: str | Path) -> tuple[int, list[str]]:
    """(rank, module paths) of a LoRA state for `unet`; `ReleasedLoraError` names the first key that does not fit."""
    modules = dict(unet.named_modules())
    ranks, targets = set(), []
    for key in sorted(state):
        module_path, kind = key.rsplit(".lora_", 1)
        module = modules.get(module_path)
        if isinstance(module, LoraLayer):  # the module already carries the other direction's adapter
            module = module.get_base_layer()
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            raise ReleasedLoraError(f"{path}: {key!r} matches no linear or conv module of this UNet")
        weight = state[key]
        rank = weight.shape[0] if kind.startswith("A") else weight.shape[1]
        if kind.startswith("A"):
            targets.append(module_path)
            expected = (rank, module.weight.shape[1], *module.weight.shape[2:])
        else:
            expected = (module.weight.shape[0], rank, *([1] * (module.weight.ndim - 2)))
        if tuple(weight.shape) != expected:
            raise ReleasedLoraError(f"{path}: {key!r} has shape {tuple(weight.shape)}, the module needs {expected} "
                                    "(a file for another model or rank)")
        ranks.add(rank)
        partner = f"{module_path}.lora_{'B' if kind.startswith('A') else 'A'}.weight"
        if partner not in state:
            raise ReleasedLoraError(f"{path}: {key!r} has no {partner.rsplit('.', 2)[-2]} partner")
    if len(ranks) != 1:
        raise ReleasedLoraError(f"{path}: mixed LoRA ranks {sorted(ranks)}")
    return ranks.pop(), targets


def attach_released(unet, path: str | Path, adapter: str, *, alpha: float = RELEASED_ALPHA) -> int:
    """Add `adapter` (lora.FORWARD / lora.REVERSE) to `unet` from the released file `path`; returns its rank."""
    state = read_state(path)
    rank, targets = check_state(unet, state, path)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=adapter)
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter}." in k]
    if missing or getattr(result, "unexpected_keys", []):
        first = (missing or result.unexpected_keys)[0]
        raise ReleasedLoraError(f"{path}: peft could not place every weight (e.g. {first})")
    unet.requires_grad_(False)
    return rank


def load_released(unet, forward: str | Path, reverse: str | Path, *,
                  boundaries: Boundaries | None = None) -> Boundaries:
    """Attach both released files to `unet`; the boundaries are `boundaries`, else those of the file names (which
    must agree with each other and with the slot each file was passed in)."""
    found = {}
    for adapter, path in ((lora.FORWARD, forward), (lora.REVERSE, reverse)):
        parsed = boundaries_from_name(path)
        if parsed is not None:
            direction, b = parsed
            if direction != DIRECTIONS[adapter]:
                raise ReleasedLoraError(f"{path}: a {direction} file passed as the {DIRECTIONS[adapter]} adapter "
                                        f"(--lora-{DIRECTIONS[adapter]})")
            found[adapter] = b
    if boundaries is None:
        if len(found) < 2:
            raise ReleasedLoraError("the boundaries are not in the LoRA file names: pass --boundaries (e.g. 4step-1)")
        if found[lora.FORWARD] != found[lora.REVERSE]:
            raise ReleasedLoraError(f"the boundary sets of {Path(forward).name} and {Path(reverse).name} do not fit "
                                    "together (files of two different models)")
        boundaries = found[lora.FORWARD]
    for adapter, path in ((lora.FORWARD, forward), (lora.REVERSE, reverse)):
        attach_released(unet, path, adapter)
    return boundaries


def released_name(direction: str, boundaries: Boundaries) -> str:
    """The released file name of a direction: forward-19-259-519-779.safetensors, reverse-259-519-779-999..."""
    times = [boundaries.start, *boundaries.forward[:-1]] if direction == "forward" else [*boundaries.reverse[1:], 999]
    return f"{direction}-{'-'.join(str(t) for t in times)}.safetensors"


def save_released(unet, directory: str | Path, boundaries: Boundaries) -> dict[str, Path]:
    """Write `unet`'s two adapters in the released format (prefixed peft keys, no alpha) under their released names.
    Only adapters trained with alpha = 8 keep their scale when the authors' loader reads them back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for adapter, direction in DIRECTIONS.items():
        state = {PREFIX + k: v for k, v in lora.adapter_state_dict(unet, adapter).items()}
        out[adapter] = save_safetensors_atomic(state, directory / released_name(direction, boundaries))
    return out
