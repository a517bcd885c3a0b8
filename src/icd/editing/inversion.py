"""The saved record of an inversion (the samplers that make one live in `icd.samplers`; `icd.pipeline` runs them).

An inversion is a pure function of (image, prompt, noise): iCD's encoding noise comes from per-sample seeds (default
0), never from the global RNG, so a saved inversion decodes exactly as the one that made it.

It decodes only on the model that made it, so it records that model (`model_record`: family, native image size and
a fingerprint of the weights it needs, `weights_fingerprint`); `check_model_record` refuses a foreign one in one line
naming what differs. Files saved before the record existed have none and pass with the shape and timestep checks
of `icd.pipeline.Pipeline.check_inversion` alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from icd.inputs import save_paths
from icd.io import file_problem, pair_paths, read_json, save_safetensors_atomic, write_text_atomic
from icd.models.base import LatentDiffusion
from icd.models.memory import stored_value


@dataclass
class Inversion:
    """The result of inverting a batch: the noise latent and every visited latent, with the timesteps.

    Saved as one safetensors file (tensors) plus a JSON file (prompts, method, timesteps, settings); loading needs
    no pickle. `null_embeddings` holds null-text inversion's per-step unconditional embeddings.
    """

    latents: list[torch.Tensor]  # latents[k] is at timesteps[k]; latents[-1] is the final noise
    timesteps: list[int]
    prompts: list[str]
    method: str
    null_embeddings: list[torch.Tensor] | None = None
    settings: dict = field(default_factory=dict)  # e.g. model, guidance of NTI, the encoding noise seed
    model_record: dict | None = None  # `model_record` of the model that made it (None: made before it existed)
    run: object = field(default=None, repr=False, compare=False)  # `icd.methods.InversionRun` of the call that made
    # it (resolved settings, UNet calls, seconds; None for a loaded one: not saved)

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]

    def __len__(self) -> int:
        return self.noise.shape[0]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.json`` and ``<path>.safetensors`` (`icd.io.pair_paths`: a trailing .json / .safetensors
        is dropped, other dots are kept: ``run.v1`` -> ``run.v1.json``), each atomically; returns the JSON path.
        A path that names no file, is too long, or has a folder, device or FIFO in the files' place, or a folder
        that cannot be written, is a ValueError naming `path` before anything is written."""
        meta_file, tensor_file = save_paths(path)
        tensors = {f"latent.{k}": v.contiguous() for k, v in enumerate(self.latents)}
        tensors |= {f"null.{k}": v.contiguous() for k, v in enumerate(self.null_embeddings or [])}
        meta = {"format": "icd-inversion/1", "method": self.method, "timesteps": list(self.timesteps),
                "prompts": list(self.prompts), "null_steps": len(self.null_embeddings or []),
                "settings": self.settings}
        if self.model_record is not None:
            meta["model_record"] = self.model_record
        text = json.dumps(meta, indent=1) + "\n"  # serialised first: a value JSON cannot hold fails before any write
        meta_file.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(tensors, tensor_file)
        write_text_atomic(meta_file, text)
        return meta_file

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        """Read ``<path>.json`` and ``<path>.safetensors`` (named as `save` names them; either file's name works);
        `InversionError` names the file and what is wrong. A file without a model record (saved before it existed)
        loads with ``model_record`` None."""
        meta_file, tensor_file = pair_paths(path)
        for f in (meta_file, tensor_file):
            problem = file_problem(f)  # a FIFO is refused before it is opened: reading it would block
            if problem:
                raise InversionError(f"cannot read inversion {f}: {problem}")
        meta = _read_meta(meta_file)
        try:
            tensors = load_file(str(tensor_file))
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise InversionError(f"cannot read inversion {tensor_file}: {_first_line(e)}") from None
        n, nulls = len(meta["timesteps"]), meta["null_steps"]
        expected = {*(f"latent.{i}" for i in range(n)), *(f"null.{i}" for i in range(nulls))}
        if set(tensors) != expected:
            raise InversionError(f"{tensor_file} holds {sum(k.startswith('latent.') for k in tensors)} latents and "
                                 f"{sum(k.startswith('null.') for k in tensors)} null embeddings, but {meta_file.name} "
                                 f"names {n} timesteps and {nulls} null steps")
        latents = [tensors[f"latent.{k}"] for k in range(n)]
        if len({tuple(z.shape) for z in latents}) > 1:
            raise InversionError(f"{tensor_file}: its latents differ in shape")
        return cls(latents=latents, timesteps=meta["timesteps"], prompts=meta["prompts"], method=meta["method"],
                   null_embeddings=[tensors[f"null.{k}"] for k in range(nulls)] or None, settings=meta["settings"],
                   model_record=meta.get("model_record"))


class InversionError(ValueError):
    """A saved inversion that cannot be read: missing, truncated or malformed files."""


_META_TYPES = {"method": str, "timesteps": list, "prompts": list, "null_steps": int}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_meta(meta_file: Path) -> dict:
    """The checked JSON half of a saved inversion."""
    try:
        meta = read_json(meta_file)
    except ValueError as e:
        raise InversionError(f"cannot read inversion {meta_file}: {e}") from None
    except OSError as e:
        raise InversionError(f"cannot read inversion {meta_file}: {e.strerror or e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "icd-inversion/1":
        raise InversionError(f"{meta_file} is not an icd inversion file (no \"format\": \"icd-inversion/1\")")
    missing = [k for k in _META_TYPES if k not in meta]
    if missing:
        raise InversionError(f"{meta_file} lacks {', '.join(missing)}")
    wrong = [k for k, t in _META_TYPES.items() if not isinstance(meta[k], t) or isinstance(meta[k], bool)]
    if not wrong and not all(isinstance(t, int) and not isinstance(t, bool) for t in meta["timesteps"]):
        wrong = ["timesteps"]
    if not wrong and not all(isinstance(p, str) for p in meta["prompts"]):
        wrong = ["prompts"]
    if not wrong and (meta["null_steps"] < 0 or not meta["timesteps"]):
        wrong = ["null_steps" if meta["null_steps"] < 0 else "timesteps"]
    if wrong or not isinstance(meta.setdefault("settings", {}), dict):
        raise InversionError(f"{meta_file}: malformed {', '.join(wrong or ['settings'])}")
    record = meta.get("model_record")
    if record is not None and not (isinstance(record, dict) and all(
            isinstance(record.get(k), t) and not isinstance(record.get(k), bool) for k, t in _RECORD_TYPES.items())):
        raise InversionError(f"{meta_file}: malformed model_record")
    return meta


# ---------------------------------------------------------------------------------------------- the model record
_RECORD_TYPES = {"family": str, "image_size": int, "weights": str}
FINGERPRINT_SAMPLES = 8  # values read from each weight tensor (evenly spaced over its elements)


@torch.no_grad()
def weights_fingerprint(model: LatentDiffusion, *, adapters: bool) -> str:
    """A short sha256 (16 hex digits) of the weights an inversion needs: every parameter's module, name and shape,
    and `FINGERPRINT_SAMPLES` of its values at evenly spaced positions rounded to fp16 (so fp32 and fp16 loads of
    one checkpoint agree), over the UNet, VAE and text encoder(s); the iCD adapters' LoRA weights only when
    `adapters` (the guidance-distilled UNet alone serves gddim). Fused adapters are read with the original
    weights active. One gather per tensor and one transfer: cheap, but callers cache it (`Pipeline`)."""
    modules = {k: v for k, v in sorted(vars(model).items()) if isinstance(v, torch.nn.Module)}
    fused = model.fused
    active = fused.active if fused is not None else None
    if fused is not None:
        fused.activate(None)
    try:
        digest, samples = hashlib.sha256(), []
        for mod_name, module in modules.items():
            for name, p in module.named_parameters():
                if not adapters and "lora_" in name:
                    continue
                digest.update(f"{mod_name}.{name}:{tuple(p.shape)};".encode())
                flat = stored_value(module, name, p).detach().reshape(-1)  # offloaded: the CPU copy
                n, k = flat.numel(), min(FINGERPRINT_SAMPLES, flat.numel())
                idx = torch.arange(k) * (n - 1) // max(k - 1, 1)  # integer positions: exact at any size
                samples.append(flat[idx.to(flat.device)].to(torch.float16))
    finally:
        if fused is not None:
            fused.activate(active)
    if samples:
        digest.update(torch.cat([s.to(samples[0].device) for s in samples]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_record(model: LatentDiffusion, *, adapters: bool, cache: dict | None = None) -> dict:
    """What an inversion made with `model` records of it: family, native image size and `weights_fingerprint`
    (with the iCD adapters when `adapters`). `cache` (the caller's dict, keyed by the model and `adapters`) keeps
    each model's record, so the fingerprint is computed once per loaded model."""
    key = (id(model), adapters)
    if cache is None or key not in cache:
        record = {"family": model.family, "image_size": int(model.image_size),
                  "weights": weights_fingerprint(model, adapters=adapters)}
        if cache is None:
            return record
        cache[key] = record
    return cache[key]


def check_model_record(inversion: Inversion, current: dict) -> None:
    """InversionError in one line naming what differs between the model that made `inversion` and `current` (the
    pipeline's `model_record`); nothing for an inversion without a record (saved before records existed)."""
    made = inversion.model_record
    if made is None:
        return
    name = inversion.settings.get("model", "?")
    for key, what in (("family", "model family"), ("image_size", "native image size"), ("weights", "weights")):
        if made.get(key) != current[key]:
            detail = "fingerprint " if key == "weights" else ""
            raise InversionError(f"this inversion was made with another model ({name}): its {what} is {detail}"
                                 f"{made.get(key)}, this model's {current[key]}; invert again with this model")
