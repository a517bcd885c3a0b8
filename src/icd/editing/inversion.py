"""The saved record of an inversion (the samplers that make one live in `icd.samplers`; `icd.pipeline` runs them).

An inversion is a pure function of (image, prompt, noise): iCD's encoding noise comes from per-sample seeds (default
0), never from the global RNG, so a saved inversion decodes exactly as the one that made it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from icd.io import save_safetensors_atomic, write_text_atomic


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
        path = Path(path).with_suffix("")
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            tensors = load_file(str(path.with_suffix(".safetensors")))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read inversion {path}: {e}") from None
        if meta.get("format") != "icd-inversion/1":
            raise ValueError(f"{path}.json is not an icd inversion file")
        latents = [tensors[f"latent.{k}"] for k in range(len(meta["timesteps"]))]
        nulls = [tensors[f"null.{k}"] for k in range(meta["null_steps"])] or None
        return cls(latents=latents, timesteps=meta["timesteps"], prompts=meta["prompts"], method=meta["method"],
                   null_embeddings=nulls, settings=meta.get("settings", {}))
