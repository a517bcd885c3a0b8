"""Which half of iCD's 4+4 reconstruction loses the PSNR: the forward encoder or the reverse decoder?

Encodes held-out world images with iCD's forward model (4 steps) and with 50-step DDIM inversion, decodes each
noise with iCD's reverse model (4 steps) and with 50-step DDIM (adapters off), all unguided, and prints the mean
reconstruction PSNR of the four pairings (docs/experiments/lr-schedule.md).

    python benchmarks/inversion_hybrids.py --n 100
    python benchmarks/inversion_hybrids.py --n 100 --adapters runs/ablation/G_cos_r05/final
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from icd.bench.cases import world_scenes
from icd.imageio import to_uint8
from icd.metrics import psnr
from icd.models import lora
from icd.models.loading import load_icd_model
from icd.samplers import ddim_decode, ddim_invert, icd_decode, icd_invert, initial_noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="held-out images (default 100)")
    ap.add_argument("--adapters", default=None, help="iCD adapters folder (default: the shipped ones)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_icd_model(adapters=args.adapters)
    cases = world_scenes(args.n)
    source = np.stack([c.source for c in cases])
    prompts = [c.source_prompt for c in cases]
    b = model.icd.boundaries
    with torch.no_grad():
        cond, z0 = model.encode_prompt(prompts), model.encode_images(source)
        s, teacher = model.schedule, model.eps_fn()  # the guidance-distilled UNet, adapters off, unguided
        reverse = model.eps_fn(adapter=lora.REVERSE)
        noise = initial_noise(z0.shape[1:], [0] * len(z0))
        _, by_icd = icd_invert(model.eps_fn(adapter=lora.FORWARD), z0, cond, b, schedule=s, noise=noise)
        grid, by_ddim = ddim_invert(teacher, z0, cond, steps=50, schedule=s)
        # DDIM 50 down from iCD's noise: DDIM inversion's grid with iCD's noise at its top (t = 999)
        decoded = {"iCD forward | iCD reverse": icd_decode(reverse, by_icd[-1], cond, b, schedule=s),
                   "iCD forward | DDIM 50": ddim_decode(teacher, by_icd[-1], cond, grid, schedule=s),
                   "DDIM 50 inversion | iCD reverse": icd_decode(reverse, by_ddim[-1], cond, b, schedule=s),
                   "DDIM 50 inversion | DDIM 50": ddim_decode(teacher, by_ddim[-1], cond, grid, schedule=s)}
        for name, z in decoded.items():
            recon = to_uint8(model.decode_latents(z))
            print(f"{name:32s} PSNR {float(np.mean(psnr(source, recon))):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
