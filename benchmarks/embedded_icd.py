"""Measure distillation on the embedded model (issue: distillation): guidance distillation, the iCD inversion
ablation (paper Tables 2 and 5 protocol) and 4-step generation.

usage:
  python benchmarks/embedded_icd.py --model runs/guidance/final \\
      --icd C=runs/ablation/C/final --icd F=runs/ablation/F/final --icd G=runs/ablation/G/final \\
      --icd G3=runs/ablation/G3/final --n 200 --n-prompts 200 --out out/bench/icd

An --icd DIR may also be a training checkpoint (``runs/icd/step-000300``); its adapters are exported first.
`--model` is a pipeline folder holding the teacher (``unet/``) and the guidance-distilled UNet
(``unet_guidance/``). Every ``--icd NAME=DIR`` row is evaluated unguided (encode and decode at w = 0) and guided
(unguided encoding, decoding at w = `--w`, without and with dynamic CFG at the adapters' tau). Teacher references:
DDIM 50+50 (and 4+4) on the guidance-distilled UNet (the paper's fDDIM50 | DDIM50 rows, baselines.md §1) and on the
original UNet with two-pass CFG, each with and without dynamic CFG. Images come from held-out world seeds (the
same 200 images as docs/RESULTS.md §1.5). Writes DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.editing.inversion import ddim_decode, ddim_invert, icd_decode, icd_invert
from icd.imageio import save_image, to_uint8
from icd.judge import JudgeScorer
from icd.metrics import psnr, ssim
from icd.models.embedded import load_icd_model, load_model
from icd.plotting import captioned_grid
from icd.sampling import generate
from icd.solver import cfg_combine
from icd.train.data import step_generator, world_dataset
from icd.train.icd import export_checkpoint

SEEDS_ONE = world.EVAL_SEED_START + 100_000
SEEDS_TWO = world.EVAL_SEED_START + 200_000
SEEDS_INV = world.EVAL_SEED_START + 300_000
SEEDS_EPS = world.EVAL_SEED_START + 400_000


def prompts_for(n: int, start: int, n_objects: int) -> list[str]:
    return [world.sample_scene(start + i, n_objects=n_objects).caption for i in range(n)]


def _quality(images: np.ndarray, recon: np.ndarray) -> dict:
    p, s = psnr(images, recon), ssim(images, recon)
    return {"psnr": float(p.mean()), "psnr_min": float(p.min()), "ssim": float(s.mean())}


def _nfe_per_image(model, n: int) -> float:
    """Network evaluations per image, counted: a two-pass CFG call on 2B rows counts 2 per image."""
    return sum(model.counter.batch_sizes) / n


@torch.no_grad()
def bench_guidance_eps(teacher, student, w_set: list[float], n: int) -> list[dict]:
    """Per w: MSE between the student's one-call eps(x, t, c, e(w)) and the teacher's two-pass CFG output, on
    held-out latents noised at t uniform on 0..999; the teacher's own error against the true noise gives the scale."""
    images, captions = world_dataset(n, seed_start=SEEDS_EPS)
    z0 = teacher.encode_images(images)
    gen = step_generator(7, 0)
    t = torch.randint(0, 1000, (n,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    x = teacher.schedule.add_noise(z0, noise, t)
    cond, uncond = teacher.encode_prompt(captions), teacher.encode_prompt([""] * n)
    eps_c, eps_u = teacher.eps(x, t, cond), teacher.eps(x, t, uncond)
    rows = []
    for w in w_set:
        target = cfg_combine(eps_c, eps_u, torch.full((n,), w))
        pred = student.eps(x, t, cond, guidance=torch.full((n,), w))
        rows.append({"w": w, "mse_student_vs_cfg": float(((pred - target) ** 2).mean()),
                     "mse_cfg_vs_true_noise": float(((target - noise) ** 2).mean()),
                     "mse_unguided_vs_cfg": float(((eps_c - target) ** 2).mean())})
    return rows


def bench_generation(model, judge, prompts: list[str], *, seed: int, **kwargs) -> tuple[dict, np.ndarray]:
    model.counter.reset()
    t0 = time.perf_counter()
    images = to_uint8(generate(model, prompts, seed=seed, **kwargs))
    report = judge.score(images, prompts)
    report.update(seconds=round(time.perf_counter() - t0, 1), nfe_per_image=_nfe_per_image(model, len(prompts)),
                  **{k: v for k, v in kwargs.items() if k != "progress"})
    return report, images


def bench_ddim_references(teacher, images, captions, w: float, taus: list[float], label: str) -> dict:
    z0 = teacher.encode_images(images)
    cond = teacher.encode_prompt(captions)
    rows = {}
    settings = [("unguided", 50, 0.0, None), ("unguided", 4, 0.0, None), ("guided", 50, w, None)]
    settings += [("guided", 50, w, tau) for tau in taus]
    for kind, steps, ww, tau in settings:
        teacher.counter.reset()
        t0 = time.perf_counter()
        inv = ddim_invert(teacher, z0, cond, captions, steps=steps)
        recon = to_uint8(teacher.decode_latents(ddim_decode(teacher, inv, cond, guidance=ww, tau=tau)))
        name = f"DDIM {steps}+{steps}" + (f", w={ww:g}" if ww else "") + (f" + d.CFG tau={tau:g}" if tau else "")
        rows[f"{label}: {name}"] = {"kind": kind, "w": ww, "tau": tau, **_quality(images, recon),
                      "nfe_per_image": _nfe_per_image(teacher, len(images)),
                      "seconds": round(time.perf_counter() - t0, 1)}
    return rows


def _training_seconds(source: Path) -> float | None:
    """Cumulative training seconds from the run's log.csv, at the checkpoint's step (or the last row)."""
    log = source.parent / "log.csv"
    if not log.is_file():
        return None
    with open(log, newline="") as f:
        rows = [r for r in csv.reader(f)][1:]
    if (source / "state.json").is_file():
        step = json.loads((source / "state.json").read_text())["step"]
        rows = [r for r in rows if int(r[0]) == step]
    return float(rows[-1][-1]) if rows else None


def _adapters(source: Path, out: Path, name: str) -> Path:
    """An adapters folder as is; a training checkpoint (step-NNNNNN) is exported first."""
    if (source / "state.json").is_file():
        return export_checkpoint(source, out / f"adapters-{name}")
    return source


def bench_icd_row(model, images, captions, w: float) -> dict:
    spec = model.icd
    z0 = model.encode_images(images)
    cond = model.encode_prompt(captions)
    out = {}
    for kind, ww, tau in (("unguided", 0.0, None), ("guided", w, None), ("guided", w, spec.tau)):
        model.counter.reset()
        t0 = time.perf_counter()
        inv = icd_invert(model, z0, cond, captions, spec.boundaries)
        recon = to_uint8(model.decode_latents(icd_decode(model, inv.noise, cond, spec.boundaries, guidance=ww,
                                                         tau=tau)))
        name = kind + (f", w={ww:g}" if ww else "") + (f" + d.CFG tau={tau:g}" if tau else "")
        out[name] = {"kind": kind, "w": ww, "tau": tau, **_quality(images, recon),
                     "nfe_per_image": _nfe_per_image(model, len(images)),
                     "seconds": round(time.perf_counter() - t0, 1)}
    return out


def markdown(r: dict) -> str:
    lines = [f"device: {r['device']}, torch {r['torch']}, model: {r['model']}", ""]
    if "guidance_eps" in r:
        lines += ["| w (CFG scale) | MSE student vs two-pass CFG | MSE unguided vs CFG | MSE CFG vs true noise |",
                  "|---|---|---|---|"]
        lines += [f"| {g['w']:g} ({g['w'] + 1:g}) | {g['mse_student_vs_cfg']:.5f} | {g['mse_unguided_vs_cfg']:.5f} "
                  f"| {g['mse_cfg_vs_true_noise']:.5f} |" for g in r["guidance_eps"]]
        lines.append("")
    if "generation" in r:
        lines += ["| generator | prompts | n | w | tau | NFE/image | exact caption % | background % | count % "
                  "| seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for g in r["generation"]:
            tau = "" if g.get("tau") is None else f"{g['tau']:g}"
            lines.append(f"| {g['name']} | {g['prompts']} | {g['n']} | {g['guidance']:g} | {tau} "
                         f"| {g['nfe_per_image']:g} | {100 * g['exact']:.1f} | {100 * g['background']:.1f} "
                         f"| {100 * g['count']:.1f} | {g['seconds']} |")
        lines.append("")
    if "inversion" in r:
        inv = r["inversion"]
        lines += [f"Reconstruction of {inv['n']} held-out images (VAE alone: {inv['vae_psnr']:.2f} dB, SSIM "
                  f"{inv['vae_ssim']:.4f}).", "",
                  "| row | encoder \\| decoder | setting | PSNR dB | PSNR min | SSIM | NFE/image | seconds "
                  "| training s |", "|---|---|---|---|---|---|---|---|---|"]
        for name, v in inv["ddim"].items():
            lines.append(f"| teacher | {name} | {v['kind']} | {v['psnr']:.2f} | {v['psnr_min']:.2f} | {v['ssim']:.4f} "
                         f"| {v['nfe_per_image']:g} | {v['seconds']} | |")
        for row, settings in inv["icd"].items():
            train_s = settings.pop("training_seconds", None)
            desc = settings.pop("description", row)
            for name, v in settings.items():
                ts = "" if train_s is None else f"{train_s:.0f}"
                lines.append(f"| {row} | {desc} | {name} | {v['psnr']:.2f} | {v['psnr_min']:.2f} | {v['ssim']:.4f} "
                             f"| {v['nfe_per_image']:g} | {v['seconds']} | {ts} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _describe(meta_dir: Path) -> str:
    cfg = json.loads((meta_dir / "adapters.json").read_text())["config"]
    n = len(cfg["reverse_boundaries"] or ()) or {"3step": 3}.get(cfg["boundaries"], 4)
    enc = f"fCD{n}" + (" + L_f" if cfg["lambda_f"] else "") if cfg["forward_cd"] else f"L_f only ({n})"
    dec = f"CD{n}" + (" + L_r" if cfg["lambda_r"] else "")
    return f"{enc} \\| {dec}, {cfg['steps']} steps"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded", help="pipeline folder with unet/ and unet_guidance/")
    ap.add_argument("--icd", action="append", default=[], metavar="NAME=DIR", help="an adapters folder to evaluate")
    ap.add_argument("--w", type=float, default=1.0, help="guidance code for guided rows (CFG scale = w + 1)")
    ap.add_argument("--n", type=int, default=200, help="held-out images for reconstruction")
    ap.add_argument("--n-prompts", type=int, default=200, help="prompts per generation row")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: eps, generation, teacher (its two "
                    "50-step generation rows), inversion, ddim (the DDIM inversion references)")
    ap.add_argument("--taus", default=None, help="dynamic-CFG thresholds of the DDIM references (default: the "
                    "adapters' taus)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    sources = {name: Path(path) for name, path in (item.split("=", 1) for item in args.icd)}
    rows = {name: _adapters(path, out, name) for name, path in sources.items()}
    teacher = load_model(args.model)
    student = load_model(args.model, unet_subfolder="unet_guidance")
    icd_models = {name: load_icd_model(args.model, adapters=folder) for name, folder in rows.items()}
    judge = JudgeScorer.load(None)
    results = {"model": args.model, "device": f"cpu ({platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "w": args.w}
    if "eps" not in skip:
        results["guidance_eps"] = bench_guidance_eps(teacher, student, [0.0, 1.0, 2.0, 3.0, 4.0], 256)
        print("guidance eps", results["guidance_eps"], flush=True)
    if "generation" not in skip:
        gens = []
        for key, start, k in (("one object", SEEDS_ONE, 1), ("two objects", SEEDS_TWO, 2)):
            prompts = prompts_for(args.n_prompts, start, k)
            runs = [] if "teacher" in skip else [
                ("teacher DDIM 50, two-pass CFG", teacher, {"method": "ddim", "steps": 50}),
                ("guidance-distilled DDIM 50", student, {"method": "ddim", "steps": 50})]
            for name, model in icd_models.items():  # the paper's deterministic jumps, as §2.2-2.3 measured them
                runs.append((f"iCD {name} reverse", model, {"method": "icd", "renoise": 0.0}))
                runs.append((f"iCD {name} reverse", model, {"method": "icd", "tau": model.icd.tau, "renoise": 0.0}))
            for name, model, kw in runs:
                report, images = bench_generation(model, judge, prompts, seed=start, guidance=args.w, **kw)
                report.update(name=name, prompts=key)
                gens.append(report)
                print(report, flush=True)
                tag = name.replace(" ", "_").replace(",", "") + ("_dcfg" if kw.get("tau") else "")
                save_image(captioned_grid(list(images[:12]), prompts[:12], cols=6), out / f"gen-{k}-{tag}.png")
        results["generation"] = gens
    if "inversion" not in skip:
        images, captions = world_dataset(args.n, seed_start=SEEDS_INV)
        z0 = teacher.encode_images(images)
        vae = to_uint8(teacher.decode_latents(z0))
        taus = sorted({float(json.loads((Path(f) / "adapters.json").read_text())["tau"]) for f in rows.values()})
        if args.taus:
            taus = [float(v) for v in args.taus.split(",")]
        inv = {"n": args.n, "vae_psnr": float(psnr(images, vae).mean()), "vae_ssim": float(ssim(images, vae).mean()),
               "ddim": {}, "icd": {}}
        if "ddim" not in skip:
            inv["ddim"] = {**bench_ddim_references(student, images, captions, args.w, taus or [0.8], "distilled"),
                           **bench_ddim_references(teacher, images, captions, args.w, taus or [0.8], "two-pass CFG")}
        print("ddim", inv["ddim"], flush=True)
        for name, model in icd_models.items():
            measured = bench_icd_row(model, images, captions, args.w)
            inv["icd"][name] = {"description": _describe(rows[name]), **measured,
                                "training_seconds": _training_seconds(sources[name])}
            print(name, inv["icd"][name], flush=True)
        results["inversion"] = inv
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(json.loads(json.dumps(results))))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
