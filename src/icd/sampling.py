"""Text-to-image sampling and the two-pass classifier-free guidance wrapper.

`CFGEps` turns a non-distilled model into an eps function with guidance: one UNet call on the batch
``[uncond; cond]`` (2B rows), combined with `cfg_combine` per sample, optionally with dynamic CFG (tau).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from icd.guidance import dynamic_guidance
from icd.models.base import Cond, LatentDiffusion
from icd.schedule import ddim_grid
from icd.solver import cfg_combine, ddim_loop

DEFAULT_RENOISE = 1.0  # iCD generation's default re-noising strength (RESULTS §2.13); inversion never re-noises


def resolved_renoise(renoise: float | None, method: str = "icd", *, name: str = "renoise") -> float:
    """A generation's re-noising strength: the given one, else DEFAULT_RENOISE for icd and 0 for ddim. Raises
    ValueError (naming the option `name`) outside [0, 1], or when it is > 0 for a method other than icd."""
    if renoise is None:
        return DEFAULT_RENOISE if method == "icd" else 0.0
    if not 0.0 <= renoise <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {renoise}")
    if renoise and method != "icd":
        raise ValueError(f"{name} applies to method 'icd' (the consistency model's multistep sampling)")
    return renoise


class CFGEps:
    """eps(x, t) with classifier-free guidance code `w` (per sample) on a non-distilled model."""

    def __init__(self, model: LatentDiffusion, cond: Cond, uncond: Cond, w: torch.Tensor | float,
                 tau: float | None = None):
        self.model, self.cond, self.uncond, self.tau = model, cond, uncond, tau
        self.w = torch.as_tensor(w, dtype=torch.float32).expand(len(cond)).clone()

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        w = dynamic_guidance(t, self.w, self.tau)
        if bool(torch.all(w == 0)):
            return self.model.eps(x, t, self.cond)
        eps = self.model.eps(torch.cat([x, x]), t, Cond.cat([self.uncond, self.cond]))
        eps_u, eps_c = eps.chunk(2)
        return cfg_combine(eps_c, eps_u, w.to(x.device))


def guided_eps(model: LatentDiffusion, cond: Cond, w: torch.Tensor | float, tau: float | None = None,
               uncond: Cond | None = None):
    """The guided eps function of `model`: one call with e(w) if distilled, else two-pass CFG."""
    if model.guidance_distilled:
        w_all = torch.as_tensor(w, dtype=torch.float32).expand(len(cond)).clone()
        return lambda x, t: model.eps(x, t, cond, guidance=dynamic_guidance(t, w_all, tau))
    if uncond is None:
        uncond = model.encode_prompt([""] * len(cond))
    return CFGEps(model, cond, uncond, w, tau)


def initial_noise(shape: Sequence[int], seeds: Sequence[int], device="cpu") -> torch.Tensor:
    """Independent N(0, I) noise per sample: row i comes from seed seeds[i] (batch-size independent)."""
    return SeededNoise(shape, seeds, device)()


class SeededNoise:
    """Per-sample N(0, I) draws: row i comes from its own generator seeded with seeds[i], so every draw of a row is
    independent of the batch it runs in. The first call gives `initial_noise`; later calls give fresh noise."""

    def __init__(self, shape: Sequence[int], seeds: Sequence[int], device="cpu"):
        self.shape, self.device = tuple(shape), device
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


@torch.no_grad()
def generate(model: LatentDiffusion, prompts: Sequence[str], *, seed: int = 0, steps: int | None = None,
             guidance: float = 0.0, tau: float | None = None, method: str = "ddim", batch_size: int = 64,
             renoise: float | None = None, progress: bool = False) -> torch.Tensor:
    """Text-to-image: images float [N,3,H,W] in [-1, 1]. `guidance` is the code w = CFG - 1.

    ``method="ddim"``: DDIM with `steps` (default 50) on the model's UNet. ``method="icd"``: the reverse iCD model's
    jumps down its boundaries (one UNet call per segment; needs `load_icd_model`); `renoise` = gamma in [0, 1]
    re-noises each intermediate landing with fresh noise (`icd.solver.renoised_jump`; 0: the paper's deterministic
    jumps; None: DEFAULT_RENOISE for icd, which generates more exact captions, RESULTS §2.13). Sample i starts from
    noise seeded with ``seed + i``, and its fresh noise comes from the same generator.
    """
    from icd.editing.inversion import icd_decode

    if method == "icd":
        if model.icd is None:
            raise ValueError("method 'icd' needs a model with iCD adapters (icd.models.embedded.load_icd_model)")
        segments = model.icd.boundaries.num_segments
        if steps not in (None, segments):
            raise ValueError(f"these iCD adapters were trained for {segments} steps, not {steps}")
    elif method != "ddim":
        raise ValueError(f"unknown generation method {method!r} (ddim or icd)")
    renoise = resolved_renoise(renoise, method)
    latent = model.unet.config.sample_size
    channels = model.unet.config.in_channels
    timesteps = [*reversed(ddim_grid(steps or 50)), 0]
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = list(prompts[start : start + batch_size])
        noise = SeededNoise((channels, latent, latent), range(seed + start, seed + start + len(chunk)), model.device)
        x = noise()
        cond = model.encode_prompt(chunk)
        if method == "icd":
            z0 = icd_decode(model, x, cond, model.icd.boundaries, guidance=guidance, tau=tau, renoise=renoise,
                            fresh_noise=noise)
        else:
            model.use_adapter(None)
            z0, _ = ddim_loop(guided_eps(model, cond, guidance, tau), x, timesteps, model.schedule)
        out.append(model.decode_latents(z0))
    return torch.cat(out)
