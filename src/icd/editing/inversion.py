"""The saved record of an inversion (the samplers that make one live in `icd.samplers`; `icd.pipeline` runs them).

An inversion is a pure function of (image, prompt, noise): iCD's encoding noise comes from per-sample seeds (default
0), never from the global RNG, so a saved inversion decodes exactly as the one that made it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from icd.io import file_problem, read_json, save_safetensors_atomic, write_text_atomic


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

    @property
    def noise(self) -> torch.Tensor:
        return self.latents[-1]

    def __len__(self) -> int:
        return self.noise.shape[0]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json`` (atomically); returns the JSON path."""
        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"latent.{k}": v.contiguous() for k, v in enumerate(self.latents)}
        tensors |= {f"null.{k}": v.contiguous() for k, v in enumerate(self.null_embeddings or [])}
        save_safetensors_atomic(tensors, path.with_suffix(".safetensors"))
        meta = {"format": "icd-inversion/1", "method": self.method, "timesteps": list(self.timesteps),
                "prompts": list(self.prompts), "null_steps": len(self.null_embeddings or []),
                "settings": self.settings}
        write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        """Read ``<path>.json`` and ``<path>.safetensors``; `InversionError` names the file and what is wrong."""
        path = Path(path).with_suffix("")
        meta_file, tensor_file = path.with_suffix(".json"), path.with_suffix(".safetensors")
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
                   null_embeddings=[tensors[f"null.{k}"] for k in range(nulls)] or None, settings=meta["settings"])


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
    return meta
