"""DDIM k+k reconstruction (unguided, embedded teacher) three ways, on the held-out inversion images of
`icd bench inversion` (the same seeds):

- ``reference``: ours with the reference rule (the default): each step's noise labelled with its destination time;
- ``start``: ours with the noise labelled with the step's start time (`icd.samplers.DDIM_RULES`);
- ``diffusers``: diffusers alone, no `icd` code on the path: `StableDiffusionPipeline` loads the model folder, its
  VAE encodes (posterior mean x scaling factor), `DDIMInverseScheduler` inverts and `DDIMScheduler` decodes on the
  same grid ("trailing" spacing 19, 39, ..., 999; time 0 is clean data: ``set_alpha_to_one``).

Reports mean PSNR per way, reference − start and reference − diffusers (mean, min, max per image).

    python benchmarks/ddim_rule.py --n 200 --steps 50 --out out/ddim_rule50.json
"""

from __future__ import annotations

import argparse
import json
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

WAYS = ("reference", "start", "diffusers")


def load_diffusers(folder: Path | str) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None)


@torch.no_grad()
def diffusers_reconstruct(sd: StableDiffusionPipeline, images: np.ndarray, prompts: list[str], *,
                          steps: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> DDIM inversion then DDIM decoding with diffusers' own schedulers -> uint8."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    z = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
    cond = sd.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    for scheduler_class in (DDIMInverseScheduler, DDIMScheduler):
        scheduler = scheduler_class.from_config(sd.scheduler.config, timestep_spacing="trailing",
                                                set_alpha_to_one=True)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            z = scheduler.step(sd.unet(z, t, encoder_hidden_states=cond).sample, t, z).prev_sample
    out = sd.vae.decode(z / sd.vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((out + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained("embedded")
    sd = load_diffusers(embedded_model_path())
    cases = world_scenes(args.n)
    scores: dict[str, list[float]] = {way: [] for way in WAYS}
    for start in tqdm(range(0, len(cases), args.batch), desc="ddim rules"):
        chunk = cases[start:start + args.batch]
        images = np.stack([c.source for c in chunk])
        prompts = [c.source_prompt for c in chunk]
        for rule in ("reference", "start"):
            r = pipe.reconstruct(images, prompts, method="ddim", steps=args.steps, ddim_rule=rule)
            scores[rule] += [float(v) for v in psnr(images, r.images)]
        scores["diffusers"] += [float(v) for v in psnr(images, diffusers_reconstruct(sd, images, prompts,
                                                                                        steps=args.steps))]

    def gap(a: str, b: str) -> dict:
        d = np.array(scores[a]) - np.array(scores[b])
        return {"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max()),
                "max_abs": float(np.abs(d).max()), "better": int((d > 0).sum())}

    report = {"n": len(cases), "steps": args.steps, "mean_psnr": {k: float(np.mean(v)) for k, v in scores.items()},
              "reference_minus_start": gap("reference", "start"),
              "reference_minus_diffusers": gap("reference", "diffusers"), "per_image": scores}
    write_text_atomic(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_image"}))
    return report


if __name__ == "__main__":
    main()
