"""Does a trained IP2P folder fit its own training triples? For N triples spread over the set: PSNR of the model's
edit against the teacher's target and against the source it reads, at several (s_T, s_I), beside the source-target
distance itself (docs/experiments/ip2p.md §6). Then a one-step probe of how much the model reads its inputs: at
t = 999, 900, 700, 500 the target latent is noised (seeded) and the model's clean-latent estimate
x0 = (x_t - sigma_t eps_hat) / alpha_t is compared with the target and the source latents (MSE), given both inputs,
the source image only, or neither (the teacher's unconditional task).

    python benchmarks/ip2p_fit.py --ip2p runs/ip2p/final --triples runs/ip2p/triples --n 24 --steps 20
"""

from __future__ import annotations

import argparse
import json

import torch

from icd.editing import ip2p
from icd.imageio import to_uint8
from icd.metrics import psnr
from icd.pipeline import Pipeline
from icd.samplers import initial_noise
from icd.solver import eps_to_x0
from icd.train.ip2p_data import TripleSpec, load_triples

SCALES = ((1.5, 2.0), (1.0, 1.0), (1.0, 4.0), (0.0, 1.0))  # (s_T, s_I); (0, 1): the image alone


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ip2p", required=True)
    ap.add_argument("--triples", required=True)
    ap.add_argument("--chunks", type=int, default=40, help="chunks of 32 in --triples (configs/embedded.toml)")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = Pipeline.from_pretrained().base()
    data = load_triples(args.triples, TripleSpec(n_chunks=args.chunks, chunk=32, seed_start=0))
    model = ip2p.IP2PModel.load(args.ip2p, model=base)
    idx = data.spread(args.n)
    src, tgt = data.source[idx], data.target[idx]
    texts = [data.instruction(i) for i in idx]

    def images(z):
        return to_uint8(base.decode_latents(z))

    source, target = images(src), images(tgt)
    report = {"n": len(idx), "steps": args.steps, "source_vs_target": float(psnr(source, target).mean()),
              "latent_mse_source_vs_target": float((src - tgt).pow(2).mean()), "rows": []}
    noise = initial_noise(src.shape[1:], list(range(len(idx))), src.device)
    for s_t, s_i in SCALES:
        with torch.no_grad():
            out = images(model.sample(src, texts, noise, steps=args.steps, text_guidance=s_t, image_guidance=s_i,
                                      schedule=base.schedule))
        report["rows"].append({"text_guidance": s_t, "image_guidance": s_i,
                               "vs_target": float(psnr(out, target).mean()),
                               "vs_source": float(psnr(out, source).mean())})
    report["x0_probe"] = x0_probe(model, base.schedule, src, tgt, texts)
    print(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def x0_probe(model: ip2p.IP2PModel, schedule, src: torch.Tensor, tgt: torch.Tensor, texts: list[str]) -> list[dict]:
    """Latent MSE of the one-step clean estimate against the target and the source, per t and input set."""
    eps = torch.randn(tgt.shape, generator=torch.Generator().manual_seed(0))
    text, empty, blank = model.encode(texts), model.encode([""] * len(texts)), torch.zeros_like(src)
    rows = []
    for t in (999, 900, 700, 500):
        tt = torch.full((len(texts),), t)
        x_t = schedule.add_noise(tgt, eps, tt)
        alpha, sigma = schedule.alpha(t).float(), schedule.sigma(t).float()
        for inputs, image, tokens in (("image+text", src, text), ("image", src, empty), ("none", blank, empty)):
            x0 = eps_to_x0(x_t, model.eps(x_t, tt, image, tokens), alpha, sigma)
            rows.append({"t": t, "inputs": inputs, "mse_target": float((x0 - tgt).pow(2).mean()),
                         "mse_source": float((x0 - src).pow(2).mean())})
    return rows


if __name__ == "__main__":
    main()
