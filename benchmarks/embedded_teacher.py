"""Measure the embedded model (issue: foundation): VAE, judge, teacher generation, DDIM inversion, noise-mean bias.

usage: python benchmarks/embedded_teacher.py [--model embedded] [--guidance 1,2,4] [--n-prompts 300] --out DIR

All images come from held-out world seeds (>= icd.world.EVAL_SEED_START). Writes DIR/results.json, DIR/results.md
and sample grids.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.editing.inversion import ddim_decode, ddim_invert
from icd.imageio import save_image, to_uint8
from icd.judge import JudgeScorer, attribute_accuracy, degrade
from icd.metrics import psnr
from icd.models.embedded import load_model
from icd.plotting import captioned_grid
from icd.sampling import generate, guided_eps, initial_noise
from icd.schedule import ddim_grid
from icd.solver import ddim_loop
from icd.train.data import step_generator, to_tensor, world_dataset

SEEDS_VAE = world.EVAL_SEED_START
SEEDS_ONE = world.EVAL_SEED_START + 100_000
SEEDS_TWO = world.EVAL_SEED_START + 200_000
SEEDS_INV = world.EVAL_SEED_START + 300_000


def prompts_for(n: int, start: int, n_objects: int) -> list[str]:
    return [world.sample_scene(start + i, n_objects=n_objects).caption for i in range(n)]


def bench_vae(model, n: int) -> dict:
    images, _ = world_dataset(n, seed_start=SEEDS_VAE)
    recon = np.concatenate([to_uint8(model.decode_latents(model.encode_images(images[i : i + 100])))
                            for i in range(0, n, 100)])
    p = psnr(images, recon)
    return {"n": n, "psnr": float(p.mean()), "psnr_min": float(p.min())}


def bench_judge(judge: JudgeScorer, n: int) -> dict:
    images, captions = world_dataset(n, seed_start=SEEDS_VAE, max_objects=3)
    truths = [world.parse_caption(c) for c in captions]
    x = to_tensor(images)
    return {"clean": attribute_accuracy(judge.read(x), truths),
            "degraded": attribute_accuracy(judge.read(degrade(x, step_generator(1, 0))), truths)}


def bench_generation(model, judge, prompts: list[str], w: float, steps: int, seed: int) -> tuple[dict, np.ndarray]:
    t0 = time.perf_counter()
    images = to_uint8(generate(model, prompts, seed=seed, steps=steps, guidance=w, progress=True))
    seconds = time.perf_counter() - t0
    report = judge.score(images, prompts)
    report.update(guidance_code=w, cfg_scale=w + 1, steps=steps, seconds=round(seconds, 1))
    return report, images


@torch.no_grad()
def bench_noise_bias(model, judge, n: int, w: float, steps: int) -> dict:
    """Background accuracy when the starting noise carries no / the right / a wrong background colour."""
    scenes = [world.sample_scene(SEEDS_ONE + i, n_objects=1) for i in range(n)]
    prompts = [s.caption for s in scenes]
    bgs = list(world.BACKGROUNDS)
    flat = {b: world.render(world.Scene((), b)) for b in bgs}
    bg_mean = {b: model.encode_images(flat[b][None]).mean(dim=(2, 3))[0] for b in bgs}  # (4,) latent channel means
    alpha = float(model.schedule.alpha(999))
    shape = (model.unet.config.in_channels, model.unet.config.sample_size, model.unet.config.sample_size)
    base = initial_noise(shape, range(n))
    centred = base - base.mean(dim=(2, 3), keepdim=True)
    cond = model.encode_prompt(prompts)
    timesteps = [*reversed(ddim_grid(steps)), 0]
    out = {}
    for name in ("plain", "right", "wrong"):
        if name == "plain":
            x = base
        else:
            pick = [s.background if name == "right" else bgs[(bgs.index(s.background) + 1) % len(bgs)]
                    for s in scenes]
            x = centred + alpha * torch.stack([bg_mean[b] for b in pick])[:, :, None, None]
        z0, _ = ddim_loop(guided_eps(model, cond, w), x, timesteps, model.schedule)
        readings = judge.read(model.decode_latents(z0))
        out[name] = float(np.mean([r.background == s.background for r, s in zip(readings, scenes)]))
    return {"n": n, "guidance_code": w, "background_accuracy": out}


def bench_inversion(model, n: int, steps_list: list[int]) -> dict:
    images, captions = world_dataset(n, seed_start=SEEDS_INV)
    z0 = model.encode_images(images)
    cond = model.encode_prompt(captions)
    vae_only = psnr(images, to_uint8(model.decode_latents(z0)))
    out = {"n": n, "vae_psnr": float(vae_only.mean())}
    for steps in steps_list:
        model.counter.reset()
        t0 = time.perf_counter()
        inv = ddim_invert(model, z0, cond, captions, steps=steps)
        recon = to_uint8(model.decode_latents(ddim_decode(model, inv, cond)))
        p = psnr(images, recon)
        out[f"ddim{steps}+{steps}"] = {"psnr": float(p.mean()), "psnr_min": float(p.min()),
                                       "nfe_per_image": model.counter.calls,  # one batched call per step
                                       "seconds": round(time.perf_counter() - t0, 1)}
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown(r: dict) -> str:
    """The tables of docs/RESULTS.md section 1 from a results dict."""
    lines = [f"device: {r['device']}, torch {r['torch']}, model: {r['model']}", ""]
    if "vae" in r:
        v = r["vae"]
        lines += ["| VAE reconstruction (posterior mean) | images | PSNR mean | PSNR min |", "|---|---|---|---|",
                  f"| 64x64 renders, held-out seeds | {v['n']} | {v['psnr']:.2f} dB | {v['psnr_min']:.2f} dB |", ""]
    if "judge" in r:
        lines += ["| judge on renders (1-3 objects) | n | exact caption % | background % | count % | size % "
                  "| colour % | shape % |", "|---|---|---|---|---|---|---|---|"]
        for k, v in r["judge"].items():
            lines.append(f"| {k} | {v['n']} | {_pct(v['exact'])} | {_pct(v['background'])} | {_pct(v['count'])} "
                         f"| {_pct(v['size'])} | {_pct(v['color'])} | {_pct(v['shape'])} |")
        lines.append("")
    if "generation" in r:
        lines += ["| prompts | n | w (CFG scale) | exact caption % | background % | count % | size % | colour % "
                  "| shape % | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for key, reports in r["generation"].items():
            for g in reports:
                lines.append(f"| {key.replace('_', ' ')} | {g['n']} | {g['guidance_code']:g} ({g['cfg_scale']:g}) "
                             f"| {_pct(g['exact'])} | {_pct(g['background'])} | {_pct(g['count'])} | {_pct(g['size'])} "
                             f"| {_pct(g['color'])} | {_pct(g['shape'])} | {g['seconds']} |")
        lines.append("")
    if "noise_bias" in r:
        b = r["noise_bias"]
        acc = b["background_accuracy"]
        lines += ["| starting noise (one-object prompts) | n | w | background accuracy % |", "|---|---|---|---|",
                  f"| plain N(0, I) | {b['n']} | {b['guidance_code']:g} | {_pct(acc['plain'])} |",
                  f"| channel means = the prompt's background | {b['n']} | {b['guidance_code']:g} "
                  f"| {_pct(acc['right'])} |",
                  f"| channel means = another background | {b['n']} | {b['guidance_code']:g} "
                  f"| {_pct(acc['wrong'])} |", ""]
    if "inversion" in r:
        inv = r["inversion"]
        lines += ["| unguided inversion + reconstruction | images | NFE per image | PSNR mean | PSNR min | seconds |",
                  "|---|---|---|---|---|---|", f"| VAE only (upper bound) | {inv['n']} | 0 | {inv['vae_psnr']:.2f} dB "
                  "| | |"]
        for k, v in inv.items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {inv['n']} | {v['nfe_per_image']} | {v['psnr']:.2f} dB | {v['psnr_min']:.2f} dB "
                             f"| {v['seconds']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--judge", default=None, help="judge weights (default: the shipped judge)")
    ap.add_argument("--guidance", default="1,2,4", help="guidance codes w = CFG - 1, comma-separated")
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--n-inversion", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: vae,judge,generation,bias,inversion")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    model = load_model(args.model)
    judge = JudgeScorer.load(args.judge)
    results = {"model": args.model, "device": f"cpu ({platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads)", "torch": torch.__version__}
    if "vae" not in skip:
        results["vae"] = bench_vae(model, 500)
        print("vae", results["vae"], flush=True)
    if "judge" not in skip:
        results["judge"] = bench_judge(judge, 2000)
        print("judge", results["judge"], flush=True)
    if "generation" not in skip:
        results["generation"] = {"one_object": [], "two_objects": []}
        for key, start, k in (("one_object", SEEDS_ONE, 1), ("two_objects", SEEDS_TWO, 2)):
            prompts = prompts_for(args.n_prompts, start, k)
            for w in [float(v) for v in args.guidance.split(",")]:
                report, images = bench_generation(model, judge, prompts, w, args.steps, seed=start)
                results["generation"][key].append(report)
                print(key, report, flush=True)
                grid = captioned_grid(list(images[:16]), prompts[:16])
                save_image(grid, out / f"samples-{key}-w{w:g}.png")
    if "bias" not in skip:
        w_best = max(results.get("generation", {}).get("one_object", [{"guidance_code": 2.0, "exact": 0}]),
                     key=lambda r: r["exact"])["guidance_code"]
        results["noise_bias"] = bench_noise_bias(model, judge, 200, w_best, args.steps)
        print("noise bias", results["noise_bias"], flush=True)
    if "inversion" not in skip:
        results["inversion"] = bench_inversion(model, args.n_inversion, [50, 4])
        print("inversion", results["inversion"], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
