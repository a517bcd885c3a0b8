"""Training throughput of both stages on the full-size architecture with random weights: guidance distillation
(`icd.train.guidance.guidance_step`) and iCD (`icd.train.icd_step.training_step`), each at the paper's per-device batch,
with and without gradient checkpointing, and the GPU-hours the paper's recipe would take at that speed.

Every iteration is what one process of `icd train` runs per step: the VAE encodes the batch's pixels and the text
encoder(s) its captions (as `icd.train.feed.RealFeed` does without a latent cache), then the stage's losses,
backward passes and optimizer steps. Speed does not depend on the weights' values, so the models are the families'
architectures randomly initialised in memory (`icd.models.sd15.random_models` / the SDXL twin of
benchmarks/sd_shaped_timing.py); the guidance stage trains every UNet weight (AdamW), the iCD stage two rank-64
LoRA adapters (alpha 8). Rows: seconds / iteration (mean after ``--warmup``), images / s, peak GPU memory, card;
``projection``: GPU-hours for ``--paper-steps`` steps at ``--global-batch`` on ``--gpus`` data-parallel GPUs at this
per-GPU speed (communication not included). The JSON is rewritten after every row.

    python benchmarks/train_throughput.py --family sd15 --device cuda --out train_sd15.json      # batch 64 = 512 / 8
    python benchmarks/train_throughput.py --device cpu --scale 20 --image-size 64 --batch 2 --iterations 2 \\
        --warmup 1 --precision no --threads 1 --out t.json                                       # CPU smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.bench.runtime import describe_device, sync
from icd.distill.guidance import init_student_from_teacher
from icd.imageio import to_tensor
from icd.io import write_text_atomic
from icd.models import lora, sd15, sdxl
from icd.runtime import Precision, ProcessGroup
from icd.train import guidance as gtrain
from icd.train.icd import ICDConfig
from icd.train.icd_step import Batch, adapter_optimizers, batch_draws, training_step

PAPER = {"sd15": {"global_batch": 512, "gpus": 8}, "sdxl": {"global_batch": 128, "gpus": 8}}


def _timing_module():
    """benchmarks/sd_shaped_timing.py (its SDXL builder and clock), loaded by path: benchmarks are scripts."""
    path = Path(__file__).with_name("sd_shaped_timing.py")
    spec = importlib.util.spec_from_file_location("sd_shaped_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(args, tmp: Path, device: torch.device):
    """(teacher, distilled) fp32 random models of the family, no adapters."""
    if args.family == "sdxl":
        teacher, distilled = _timing_module().sdxl_random_models(tmp, device=device, dtype=torch.float32,
                                                                  tiny=args.tiny, image_size=args.image_size)
        distilled = teacher.with_unet(init_student_from_teacher(teacher.unet).to(device))
        return teacher, distilled
    return sd15.random_models(tmp, vocabulary=world.vocabulary(), device=device, scale=args.scale,
                              image_size=args.image_size, rank=None)


def inputs(batch: int, size: int, step: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(step)
    captions = [world.sample_scene(step * batch + i).caption for i in range(batch)]
    return rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), captions


@torch.no_grad()
def encode(model, images: np.ndarray, captions: list[str]):
    """What `RealFeed.rows` does each step: VAE posterior mean x scaling factor, and the captions' conditioning."""
    x = to_tensor(images).to(device=model.vae.device, dtype=model.vae.dtype)
    z0 = model.vae.encode(x).latent_dist.mean.float() * model.vae.config.scaling_factor
    return z0, model.encode_prompt(captions)


def run_stage(stage: str, args, teacher, distilled, device, checkpointing: bool) -> dict:
    group, precision = ProcessGroup(str(device)), Precision(args.precision, device)
    common = dict(batch_size=args.batch, mixed_precision=args.precision, gradient_checkpointing=checkpointing,
                  device=str(device))
    if stage == "guidance":
        cfg = gtrain.GuidanceConfig(**common, w_set=(0.0, 7.0, 11.0, 15.0, 19.0))
        student = init_student_from_teacher(teacher.unet).to(device)
        model = teacher.with_unet(student)  # with_unet freezes its UNet: the student trains every weight
        student.requires_grad_(True).train()
        if checkpointing:
            student.enable_gradient_checkpointing()
        params = list(student.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr)
    else:
        cfg = ICDConfig(**common, rank=64, alpha=8)
        model = distilled
        lora.add_adapters(model.unet, rank=64, alpha=8)
        model.unet.to(device)
        if checkpointing:
            model.unet.enable_gradient_checkpointing()
            model.unet.train()
        params, opts = adapter_optimizers(model, cfg)
        boundaries = cfg.resolved_boundaries()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.iterations):
        sync(device)
        t0 = time.perf_counter()
        z0, cond = encode(model, *inputs(args.batch, args.image_size, step))
        if stage == "guidance":
            d = gtrain.guidance_draws(cfg, step, n_data=1, shape=tuple(z0.shape[1:]), num_timesteps=1000)
            d = {k: v.to(device) for k, v in d.items()}
            gtrain.guidance_step(model, teacher, cfg, gtrain.Batch(z0, cond, teacher.empty_cond(args.batch), d),
                                 opt=opt, params=params, sync=group, precision=precision)
        else:
            d = batch_draws(cfg, step, n_data=1, shape=tuple(z0.shape[1:]), num_segments=boundaries.num_segments)
            d = {k: v.to(device) for k, v in d.items()}
            training_step(model, cfg, Batch(z0, cond, d, boundaries), params=params, opts=opts, sync=group,
                          precision=precision)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = float(np.mean(times))
    images_per_s = args.batch / step_s
    paper = PAPER[args.family]
    gpu_hours = args.paper_steps * paper["global_batch"] / images_per_s / 3600  # per-GPU speed, data parallel
    return {"stage": stage, "gradient_checkpointing": checkpointing, "batch": args.batch,
            "precision": args.precision, "iterations": args.iterations, "step_s": round(step_s, 4),
            "images_per_s": round(images_per_s, 3),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
            "projection": {"steps": args.paper_steps, "global_batch": paper["global_batch"], "gpus": args.gpus,
                           "gpu_hours": round(gpu_hours, 1), "wall_hours": round(gpu_hours / args.gpus, 2)}}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=None, help="per-device batch (default: the paper's global / 8)")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp16", choices=["no", "bf16", "fp16"])
    p.add_argument("--stages", default="guidance,icd")
    p.add_argument("--checkpointing", default="off,on", help="comma list of off / on")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--scale", type=int, default=1, help="SD 1.5 channel divisor (CPU smoke tests)")
    p.add_argument("--tiny", action="store_true", help="SDXL at width 32 (CPU smoke tests)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--paper-steps", type=int, default=6000)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    family = sd15 if args.family == "sd15" else sdxl
    args.image_size = args.image_size or family.NATIVE_SIZE
    args.batch = args.batch or PAPER[args.family]["global_batch"] // 8
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {"family": args.family, "device": describe_device(device), "image_size": args.image_size, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            for flag in args.checkpointing.split(","):
                teacher, distilled = build(args, Path(tmp) / f"{stage}-{flag}", device)
                try:
                    row = run_stage(stage, args, teacher, distilled, device, flag == "on")
                except torch.cuda.OutOfMemoryError as e:
                    row = {"stage": stage, "gradient_checkpointing": flag == "on", "error": f"out of memory: {e}"[:200]}
                print(json.dumps(row), file=sys.stderr, flush=True)
                report["rows"].append(row)
                write_text_atomic(args.out, json.dumps(report, indent=1))
                del teacher, distilled
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return report


if __name__ == "__main__":
    main()
