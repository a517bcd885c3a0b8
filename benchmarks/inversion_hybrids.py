"""Which half of iCD's 4+4 reconstruction loses the PSNR: the forward encoder or the reverse decoder?

Encodes held-out world images with iCD's forward model (4 steps) and with 50-step DDIM inversion, decodes each
noise with iCD's reverse model (4 steps) and with 50-step DDIM (adapters off), all unguided, and prints the mean
reconstruction PSNR of the four pairings (docs/RESULTS.md §2.4).

    python benchmarks/inversion_hybrids.py --n 100
    python benchmarks/inversion_hybrids.py --n 100 --adapters runs/ablation/G_cos_r05/final
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from icd.bench.cases import world_scenes
from icd.editing.inversion import ddim_decode, ddim_invert, icd_decode, icd_invert
from icd.imageio import to_uint8
from icd.metrics import psnr
from icd.models.embedded import load_icd_model


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
        by_icd = icd_invert(model, z0, cond, prompts, b)
        by_ddim = ddim_invert(model, z0, cond, prompts, steps=50)
        # DDIM 50 down from iCD's noise: reuse DDIM inversion's grid with iCD's noise at its top (t = 999)
        ddim_grid_noise = dataclasses.replace(by_ddim, latents=[*by_ddim.latents[:-1], by_icd.noise])
        decoded = {"iCD forward | iCD reverse": icd_decode(model, by_icd.noise, cond, b),
                   "iCD forward | DDIM 50": ddim_decode(model, ddim_grid_noise, cond),
                   "DDIM 50 inversion | iCD reverse": icd_decode(model, by_ddim.noise, cond, b),
                   "DDIM 50 inversion | DDIM 50": ddim_decode(model, by_ddim, cond)}
        for name, z in decoded.items():
            recon = to_uint8(model.decode_latents(z))
            print(f"{name:32s} PSNR {float(np.mean(psnr(source, recon))):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
