"""DDIM k+k reconstruction (unguided, embedded teacher) several ways, on the held-out inversion images of
`icd bench inversion` (the same seeds):

- ``reference``: ours with the reference rule (the default): each step's noise labelled with its destination time
  (`icd reconstruct --method ddim`: the model's scheduler-config end points on the trailing grid, docs/baselines.md
  §2.1);
- ``start``: ours with the noise labelled with the step's start time (`icd.samplers.DDIM_RULES`);
- ``diffusers``: diffusers alone, no `icd` code on the path: `StableDiffusionPipeline` loads the model folder, its
  VAE encodes (posterior mean x scaling factor), `DDIMInverseScheduler` inverts and `DDIMScheduler` decodes on the
  same grid ("trailing" spacing 19, 39, ..., 999) with time 0 as clean data (``set_alpha_to_one``), as `icd` did
  before it followed the config's end points;
- ``endpoint``: the same loop with the reference code's end points (``set_alpha_to_one=False``: inversion starts
  from alpha-bar_0, decoding lands on alpha-bar_0), still on the trailing grid: what `icd` runs now;
- ``config``: the same loop with both schedulers built from the model's own ``scheduler_config.json`` as it is
  (``set_alpha_to_one=False``, "leading" spacing with ``steps_offset`` 1: 1, 21, ..., 981 at 50 steps), the
  Prompt-to-Prompt / null-text reference code's schedule.

Every way inverts and decodes unguided (w = 0, as `icd bench inversion`'s default). Reports the mean PSNR per way and,
paired per image, reference − start, reference − diffusers, endpoint − reference and config − reference (mean with
its 95 % t interval, sd, min, max, images where the first is better).

    python benchmarks/ddim_rule.py --n 200 --steps 50 --out out/ddim_rule50.json
    python benchmarks/ddim_rule.py --n 200 --steps 50 --ways reference,diffusers,endpoint,config --threads 1 \
        --out out/ddim_endpoints50.json                      # the end points (tracker issue 39, item 5)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline
from tqdm.auto import tqdm

from icd.bench.cases import world_scenes
from icd.io import write_text_atomic
from icd.metrics import psnr
from icd.paths import embedded_model_path
from icd.pipeline import Pipeline

WAYS = ("reference", "start", "diffusers", "endpoint", "config")
OURS = ("reference", "start")
# scheduler overrides of each diffusers way ({}: the model's scheduler config as it is)
SCHEDULES = {"diffusers": {"timestep_spacing": "trailing", "set_alpha_to_one": True},
             "endpoint": {"timestep_spacing": "trailing", "set_alpha_to_one": False},
             "config": {}}


def load_diffusers(folder: Path | str) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None)


@torch.no_grad()
def diffusers_reconstruct(sd: StableDiffusionPipeline, images: np.ndarray, prompts: list[str], *,
                          steps: int, schedule: dict | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] -> DDIM inversion then DDIM decoding with diffusers' own schedulers -> uint8. `schedule`:
    overrides of the model's scheduler config (default: trailing spacing, ``set_alpha_to_one``, as `icd` runs)."""
    schedule = SCHEDULES["diffusers"] if schedule is None else schedule
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
    cond = sd.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    for scheduler_class in (DDIMInverseScheduler, DDIMScheduler):
        scheduler = scheduler_class.from_config(sd.scheduler.config, **schedule)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            z = scheduler.step(sd.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    out = sd.vae.decode(z / sd.vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((out + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion around the normal one (error < 1e-4 for df >= 10)."""
    z = math.sqrt(2) * _erfinv(2 * p - 1)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def _erfinv(y: float) -> float:
    """Inverse error function (Newton on math.erf from a rational start)."""
    x = 0.0 if y == 0 else math.copysign(math.sqrt(-math.log((1 - abs(y)) / 2)) * 0.9, y)
    for _ in range(60):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


def paired(a: list[float], b: list[float]) -> dict:
    """a − b per item: mean, its 95 % t interval, sd, min, max, items where a > b."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = t_quantile(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "sd": float(d.std(ddof=1)) if len(d) > 1 else float("nan"), "min": float(d.min()), "max": float(d.max()),
            "max_abs": float(np.abs(d).max()), "better": int((d > 0).sum()), "n": len(d)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--ways", default=",".join(WAYS[:3]), help=f"comma-separated, of {', '.join(WAYS)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    bad = [w for w in ways if w not in WAYS]
    if bad or not ways:
        ap.error(f"--ways: unknown {bad[0]!r}; choose from {', '.join(WAYS)}" if bad else "--ways names no way")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained("embedded")
    sd = load_diffusers(embedded_model_path()) if any(w in SCHEDULES for w in ways) else None
    cases = world_scenes(args.n)
    scores: dict[str, list[float]] = {way: [] for way in ways}
    for start in tqdm(range(0, len(cases), args.batch), desc="ddim rules"):
        chunk = cases[start:start + args.batch]
        images = np.stack([c.source for c in chunk])
        prompts = [c.source_prompt for c in chunk]
        for way in ways:
            if way in OURS:
                recon = pipe.reconstruct(images, prompts, method="ddim", steps=args.steps, guidance=0.0,
                                         ddim_rule=way).images
            else:
                recon = diffusers_reconstruct(sd, images, prompts, steps=args.steps, schedule=SCHEDULES[way])
            scores[way] += [float(v) for v in psnr(images, recon)]

    report = {"n": len(cases), "steps": args.steps, "threads": torch.get_num_threads(),
              "mean_psnr": {k: float(np.mean(v)) for k, v in scores.items()}}
    if {"reference", "start"} <= set(ways):
        report["reference_minus_start"] = paired(scores["reference"], scores["start"])
    if {"reference", "diffusers"} <= set(ways):
        report["reference_minus_diffusers"] = paired(scores["reference"], scores["diffusers"])
    if "reference" in ways:
        for way in ways:
            if way in SCHEDULES and way != "diffusers":
                report[f"{way}_minus_reference"] = paired(scores[way], scores["reference"])
    report["per_image"] = scores
    write_text_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}))
    return report


if __name__ == "__main__":
    main()
