"""DDIM inversion's two noise-label rules (`icd.samplers.DDIM_RULES`) on the embedded teacher: reconstruction PSNR of
DDIM k+k inversion (unguided) with the noise labelled by the step's start ("start", our default) or its destination
("reference", the Prompt-to-Prompt / null-text inversion reference code and diffusers' DDIMInverseScheduler), on the
held-out inversion images of `icd bench inversion` (the same seeds), per image and on average.

    python benchmarks/ddim_rule.py --n 200 --steps 50 --out out/ddim_rule.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from icd.bench.cases import world_scenes
from icd.io import write_text_atomic
from icd.metrics import psnr
from icd.pipeline import Pipeline
from icd.samplers import DDIM_RULES


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    pipe = Pipeline.from_pretrained("embedded")
    cases = world_scenes(args.n)
    scores: dict[str, list[float]] = {rule: [] for rule in DDIM_RULES}
    for start in tqdm(range(0, len(cases), args.batch), desc="ddim rules"):
        chunk = cases[start:start + args.batch]
        images = np.stack([c.source for c in chunk])
        for rule in DDIM_RULES:
            r = pipe.reconstruct(images, [c.source_prompt for c in chunk], method="ddim", steps=args.steps,
                                 ddim_rule=rule)
            scores[rule] += [float(v) for v in psnr(images, r.images)]
    gain = np.array(scores["reference"]) - np.array(scores["start"])
    report = {"n": len(cases), "steps": args.steps, "mean_psnr": {k: float(np.mean(v)) for k, v in scores.items()},
              "reference_minus_start": {"mean": float(gain.mean()), "min": float(gain.min()),
                                        "max": float(gain.max()), "better": int((gain > 0).sum())},
              "per_image": scores}
    write_text_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}))
    return report


if __name__ == "__main__":
    main()
