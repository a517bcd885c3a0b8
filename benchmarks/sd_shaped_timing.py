"""Time the Stable-Diffusion-1.5-shaped path: editing at 512x512 and one iCD training step (random weights).

No SD weights can be downloaded here, and speed does not depend on the weights' values, so the models are SD 1.5's
architecture randomly initialised (`icd.models.sd15`; the iCD adapters are rank-64 LoRA, fused for inference).
Editing: one 512x512 image, P2P word swap, source + one target decoded in one batch; iCD 4+4 against DDIM, NPI and
NTI at 50+50 (two-pass CFG at w = 1, i.e. CFG scale 2; each row states its UNet calls). Training: one `training_step` of
`icd train icd` (all four losses, both adapters' optimizer steps) per precision / checkpointing setting, with peak
GPU memory. Results go to a JSON file; docs/RESULTS.md quotes them with the device.

    python benchmarks/sd_shaped_timing.py --device cuda --out sd_timing.json
    python benchmarks/sd_shaped_timing.py --device cpu --scale 10 --image-size 128 --repeats 1 --out t.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from icd import world
from icd.bench.runtime import describe_device, sync
from icd.editing.edit import EditControls
from icd.io import write_text_atomic
from icd.models import lora, sd15
from icd.models.base import Cond
from icd.pipeline import Pipeline
from icd.runtime import Precision, ProcessGroup
from icd.train.icd import Batch, ICDConfig, adapter_optimizers, batch_draws, training_step

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EDIT_METHODS = (("icd", None), ("ddim", 50), ("npi", 50), ("nti", 50))


def describe_error(e: BaseException) -> str:
    """One line for a row that failed: the exception type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def edit_timings(editor: Pipeline, device: torch.device, repeats: int, methods=EDIT_METHODS) -> list[dict]:
    """Seconds and UNet calls of invert + edit per method: one warm-up run, then the mean of `repeats` runs (NTI,
    ~40x the others: one run, after the others have warmed the same kernels)."""
    scene = world.sample_scene(7, max_objects=1)
    image = world.render(scene)[None]
    source = scene.caption
    color = scene.objects[0].color
    target = source.replace(color, "blue" if color != "blue" else "red", 1)
    counter = editor.model.counter
    rows = []
    for method, steps in methods:
        row = {"method": method, "steps": steps}
        warmup, runs = (0, 1) if method == "nti" else (1, repeats)
        try:
            for k in range(warmup + runs):
                reset_peak(device)
                calls0 = counter.calls
                sync(device)
                t0 = time.perf_counter()
                inv = editor.invert(image, [source], method=method, steps=steps)
                sync(device)
                t1 = time.perf_counter()
                calls1 = counter.calls
                result = editor.edit(inv, [target], EditControls())
                sync(device)
                t2 = time.perf_counter()
                if k < warmup:  # kernel selection, lazy loading
                    continue
                for key, value in (("invert_s", t1 - t0), ("edit_s", t2 - t1), ("total_s", t2 - t0)):
                    row[key] = row.get(key, 0.0) + value / runs
                row |= {"nfe_invert": calls1 - calls0, "nfe_edit": result.nfe, "peak_gib": peak_gib(device)}
        except Exception as e:  # a row that fails is reported, the others still run
            row["error"] = describe_error(e)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def train_timings(tokenizer_dir: Path, device: torch.device, *, scale: int, image_size: int, batch: int,
                  settings: list[tuple[str, bool]], steps: int) -> list[dict]:
    """Seconds per `training_step` (fp32 master weights, rank-64 adapters) for each (precision, checkpointing)."""
    _, model = sd15.random_models(tokenizer_dir, vocabulary=world.vocabulary(), device=device,
                                  dtype=torch.float32, scale=scale, image_size=image_size, rank=None)
    lora.add_adapters(model.unet, rank=64, alpha=64)
    model.unet.to(device)
    group = ProcessGroup(str(device))
    latent = image_size // 8
    z_all = torch.randn(batch, 4, latent, latent, device=device)
    tokens = torch.randn(batch, sd15.MAX_LENGTH, model.unet.config.cross_attention_dim, device=device)
    rows = []
    for mode, checkpointing in settings:
        row = {"mixed_precision": mode, "gradient_checkpointing": checkpointing, "batch": batch}
        try:
            cfg = ICDConfig(batch_size=batch, mixed_precision=mode, gradient_checkpointing=checkpointing, rank=64,
                            alpha=64, device=str(device))
            boundaries = cfg.resolved_boundaries()
            if checkpointing:
                model.unet.enable_gradient_checkpointing()
                model.unet.train()
            else:
                model.unet.disable_gradient_checkpointing()
                model.unet.eval()
            params, opts = adapter_optimizers(model, cfg)
            precision = Precision(mode, device)
            reset_peak(device)
            times, losses = [], {}
            for step in range(2 + steps):
                d = batch_draws(cfg, step, n_data=batch, shape=tuple(z_all.shape[1:]),
                                num_segments=boundaries.num_segments)
                d = {k: v.to(device) for k, v in d.items()}
                sync(device)
                t0 = time.perf_counter()
                losses = training_step(model, cfg, Batch(z_all[d["idx"]], Cond(tokens=tokens[d["idx"]]), d, boundaries),
                                       params=params, opts=opts, sync=group, precision=precision)
                sync(device)
                if step >= 2:
                    times.append(time.perf_counter() - t0)
            row |= {"step_s": sum(times) / len(times), "peak_gib": peak_gib(device),
                    "losses": {k: float(v) for k, v in losses.items()}}
        except Exception as e:
            row["error"] = describe_error(e)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="inference dtype of the editing rows")
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (1 = SD 1.5)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per editing method (after one warm-up; NTI: 1)")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps per setting (after 2 warm-ups)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: edit, train")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    report = {"device": describe_device(device), "torch": torch.__version__, "scale": args.scale,
              "image_size": args.image_size, "inference_dtype": args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        if "edit" not in skip:
            base, icd = sd15.random_models(Path(tmp) / "tok", vocabulary=world.vocabulary(), device=device,
                                           dtype=DTYPES[args.dtype], scale=args.scale, image_size=args.image_size)
            report["params_unet_m"] = sum(p.numel() for p in base.unet.parameters()) / 1e6
            report["edit"] = edit_timings(Pipeline(icd, base), device, args.repeats)
            del base, icd
        if "train" not in skip:
            settings = [("bf16", False), ("bf16", True), ("fp16", False), ("no", False)]
            report["train"] = train_timings(Path(tmp) / "tok", device, scale=args.scale, image_size=args.image_size,
                                            batch=args.train_batch, settings=settings, steps=args.train_steps)
    out = Path(args.out)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
