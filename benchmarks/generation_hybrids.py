"""Which of the reverse model's four jumps loses the two-object generations?

Generates held-out world captions from the same noise with hybrids of the 50-step guidance-distilled teacher and
iCD's reverse model, split at a segment boundary: "teacher above b" runs DDIM on the 50-step grid from t = 999 down
to the boundary b and then the reverse model's jumps from b to 0; "iCD above b" runs the reverse model's jumps down
to b and then DDIM from b to 0. With --gamma, the reverse model's jumps are also run with re-noising
(`icd generate --renoise g`, `icd.solver.renoised_jump`: each jump lands on x0_hat and re-noises it to the boundary
with (1 - g^2)^0.5 eps_hat + g z, z fresh noise; g = 1 is multistep consistency sampling, g = 0 iCD's deterministic
jump). Prints the world judge's exact-caption and
object-count accuracy per variant (docs/experiments/renoised-generation.md). Constant guidance w, as `icd generate`.

    python benchmarks/generation_hybrids.py --n 200
    python benchmarks/generation_hybrids.py --n 200 --adapters runs/ablation/R64_f30/final --guidance 2
    python benchmarks/generation_hybrids.py --n 200 --gamma 0.5,1 --no-hybrids
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from icd.bench.cases import SEED_START
from icd.bench.generation import caption_scores, prompt_cases
from icd.imageio import to_uint8
from icd.judge import JudgeScorer
from icd.models import lora
from icd.models.loading import load_icd_model
from icd.samplers import SeededNoise, ddim_loop, icd_decode
from icd.schedule import ddim_grid

TEACHER_GRID = [*reversed(ddim_grid(50)), 0]  # the teacher's 50-step DDIM, T-1 -> 0


def hybrid_schedule(reverse_schedule: list[int], split: int, teacher_above: bool) -> list[tuple[str, list[int]]]:
    """[(who, timesteps), ...] from T-1 to 0, switching between the teacher's 50-step grid and the iCD jumps at
    `split` (one of the reverse model's boundaries)."""
    teacher_hi = [t for t in TEACHER_GRID if t >= split]
    teacher_lo = [t for t in TEACHER_GRID if t <= split]
    icd_hi = [t for t in reverse_schedule if t >= split]
    icd_lo = [t for t in reverse_schedule if t <= split]
    parts = [("teacher", teacher_hi), ("icd", icd_lo)] if teacher_above else [("icd", icd_hi), ("teacher", teacher_lo)]
    return [(who, ts) for who, ts in parts if len(ts) > 1]


@torch.no_grad()
def run_variant(model, parts: list[tuple], noise: SeededNoise, cond, w: torch.Tensor) -> torch.Tensor:
    """Clean latents from the first draw of `noise`: each part is (who, timesteps) or ("renoise", gamma), in order."""
    x = noise()
    for who, ts, *_ in parts:
        if who == "renoise":  # as `icd bench generation --renoise`: later draws of each row's own generator
            eps = model.eps_fn(adapter=lora.REVERSE, guidance=w)
            x = icd_decode(eps, x, cond, model.icd.boundaries, schedule=model.schedule, renoise=ts, fresh_noise=noise)
            continue
        eps = model.eps_fn(adapter=lora.REVERSE if who == "icd" else None, guidance=w)
        x, _ = ddim_loop(eps, x, cond, ts, schedule=model.schedule)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="held-out captions per object count (default 200)")
    ap.add_argument("--adapters", default=None, help="iCD adapters folder (default: the shipped ones)")
    ap.add_argument("--guidance", type=float, default=1.0, help="guidance code w = CFG - 1 (default 1)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--gamma", default="", help="comma-separated re-noising strengths of extra iCD rows, e.g. 0.5,1")
    ap.add_argument("--no-hybrids", action="store_true", help="skip the teacher/iCD hybrids (iCD rows only)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_icd_model(adapters=args.adapters)
    judge = JudgeScorer.load(None)
    cases = prompt_cases(args.n, SEED_START["generation"])  # `icd bench generation`'s captions and seeds
    rev = model.icd.boundaries.reverse_schedule()
    variants = {"iCD (4 jumps)": [("icd", rev)]}
    if not args.no_hybrids:
        variants["teacher DDIM 50"] = [("teacher", TEACHER_GRID)]
    for g in [float(g) for g in args.gamma.split(",") if g]:
        variants[f"iCD, re-noised gamma {g:g}"] = [("renoise", g)]
    if not args.no_hybrids:
        for b in rev[1:-1]:
            variants[f"teacher above {b}, iCD below"] = hybrid_schedule(rev, b, teacher_above=True)
            variants[f"iCD above {b}, teacher below"] = hybrid_schedule(rev, b, teacher_above=False)
    acc: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    shape = (model.unet.config.in_channels, *(2 * [model.unet.config.sample_size]))
    for start in range(0, len(cases), args.batch):  # each batch's prompts and noise serve every variant
        chunk = cases[start : start + args.batch]
        prompts = [c.source_prompt for c in chunk]
        with torch.no_grad():
            cond = model.encode_prompt(prompts)
        w = torch.full((len(chunk),), args.guidance)
        for name, parts in variants.items():
            with torch.no_grad():
                noise = SeededNoise(shape, [c.seed for c in chunk], model.device)
                images = to_uint8(model.decode_latents(run_variant(model, parts, noise, cond, w)))
            for c, row in zip(chunk, caption_scores(judge, images, prompts)):
                acc[name].setdefault(c.kind, []).append(row["judge_accuracy"])
                acc[name].setdefault(c.kind + " count", []).append(row["count_accuracy"])
    for name, cells in acc.items():
        print(f"{name:34s} " + "  ".join(f"{k} {100 * np.mean(v):5.1f}%" for k, v in cells.items()), flush=True)


if __name__ == "__main__":
    main()
