"""Inversions: image latents -> noise, and back.

- DDIM inversion (baselines.md §2): deterministic DDIM up an explicit grid with the source prompt at w = 0, noise
  evaluated at each step's starting point, from z0 at t = 0.
- iCD inversion (method.md §8.1): noise z0 to x_19 with explicit noise, then the forward model's jumps
  19 -> E_F[0] -> ... -> 999 at w = 0 with the source prompt; decoding runs the reverse model's jumps
  999 -> E_R[-1] -> ... -> 0 with dynamic guidance. Inversion is a pure function of (image, prompt, noise): the
  noise comes from an explicit tensor or from per-sample seeds (default 0), never from the global RNG.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icd.boundaries import Boundaries
from icd.guidance import dynamic_guidance
from icd.models import lora
from icd.models.base import Cond, LatentDiffusion
from icd.sampling import guided_eps, initial_noise
from icd.schedule import ddim_grid
from icd.solver import ddim_loop, renoised_jump


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
        from safetensors.torch import save_file

        from icd.train.checkpoint import write_text_atomic

        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"latent.{k}": v.contiguous() for k, v in enumerate(self.latents)}
        tensors |= {f"null.{k}": v.contiguous() for k, v in enumerate(self.null_embeddings or [])}
        tmp = path.with_name(path.name + ".safetensors.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path.with_suffix(".safetensors"))
        meta = {"format": "icd-inversion/1", "method": self.method, "timesteps": list(self.timesteps),
                "prompts": list(self.prompts), "null_steps": len(self.null_embeddings or []),
                "settings": self.settings}
        write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        from safetensors.torch import load_file

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


@torch.no_grad()
def ddim_invert(model: LatentDiffusion, z0: torch.Tensor, cond: Cond, prompts: list[str], *, steps: int = 50
                ) -> Inversion:
    """Unguided DDIM inversion 0 -> g_0 -> ... -> g_{n-1} (n = `steps` UNet calls)."""
    timesteps = [0, *ddim_grid(steps)]
    model.use_adapter(None)
    _, visited = ddim_loop(lambda x, t: model.eps(x, t, cond), z0, timesteps, model.schedule)
    return Inversion(latents=visited, timesteps=timesteps, prompts=list(prompts), method="ddim")


@torch.no_grad()
def ddim_decode(model: LatentDiffusion, inversion: Inversion, cond: Cond, *, guidance: float = 0.0,
                tau: float | None = None) -> torch.Tensor:
    """DDIM from the inversion's noise back down its own grid to t = 0; returns clean latents."""
    timesteps = list(reversed(inversion.timesteps))
    model.use_adapter(None)
    z0, _ = ddim_loop(guided_eps(model, cond, guidance, tau), inversion.noise, timesteps, model.schedule)
    return z0


@torch.no_grad()
def icd_invert(model: LatentDiffusion, z0: torch.Tensor, cond: Cond, prompts: list[str], boundaries: Boundaries,
               *, noise: torch.Tensor | None = None, seed: int = 0) -> Inversion:
    """Forward-model encoding (method.md §8.1): x_start = alpha z0 + sigma eps, then one F call per segment."""
    if noise is None:
        noise = initial_noise(z0.shape[1:], [seed] * z0.shape[0], z0.device)
    timesteps = boundaries.forward_schedule()
    x_start = model.schedule.add_noise(z0, noise.to(z0.dtype), timesteps[0])
    model.use_adapter(lora.FORWARD)
    zero = torch.zeros(z0.shape[0])
    _, visited = ddim_loop(lambda x, t: model.eps(x, t, cond, guidance=zero), x_start, timesteps, model.schedule)
    return Inversion(latents=visited, timesteps=timesteps, prompts=list(prompts), method="icd")


@torch.no_grad()
def icd_decode(model: LatentDiffusion, noise: torch.Tensor, cond: Cond, boundaries: Boundaries, *,
               guidance: torch.Tensor | float = 0.0, tau: float | None = None, renoise: float = 0.0,
               fresh_noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Reverse-model decoding 999 -> ... -> 0 with per-sample guidance codes and dynamic CFG threshold tau.

    `renoise` = gamma > 0 (generation only) re-noises each intermediate landing with `fresh_noise()`
    (`icd.solver.renoised_jump`); 0 is the paper's deterministic jumps, which inversion needs.
    """
    w = torch.as_tensor(guidance, dtype=torch.float32).expand(noise.shape[0]).clone()
    model.use_adapter(lora.REVERSE)

    def eps(x, t):
        return model.eps(x, t, cond, guidance=dynamic_guidance(t, w, tau))

    schedule = boundaries.reverse_schedule()
    if not renoise:
        return ddim_loop(eps, noise, schedule, model.schedule)[0]
    if fresh_noise is None:
        raise ValueError("icd_decode: renoise > 0 needs fresh_noise")
    x = noise
    for t, s in zip(schedule, schedule[1:]):
        z = fresh_noise() if s > 0 else torch.zeros_like(x)
        x = renoised_jump(x, eps(x, t), t, s, model.schedule, renoise, z)
    return x
