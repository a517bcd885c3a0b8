"""The embedded flow teacher, judged: 50-step Euler generation with two-pass classifier-free guidance from held-out
one- and two-object captions, scored by the world judge (docs/flow.md §4; the flow counterpart of RESULTS §5).

usage:
  python benchmarks/embedded_flow_teacher.py --model runs/flow-teacher/final --guidance 0,1,2,4 --n-prompts 300 \
      --out out/bench/embedded-flow [--noise-test 200]

Generation is diffusers' own `FluxPipeline` (Euler on FLUX's shifted grid, ``true_cfg_scale = 1 + w`` with the empty
negative prompt; w = 0 is one conditional pass), ``max_sequence_length`` = the trained T5 length, each prompt's
starting noise seeded by its world seed (held out: >= 1 000 000 000). ``--noise-test N`` repeats the embedded model's
background pitfall check (docs/experiments/embedded-model.md §1.4) at the best guidance: the starting noise's
per-channel means are replaced by 0.068 x the latent channel means of a flat image of the prompt's background
("right") or another background ("wrong"); background accuracy should not move. Writes results.json and sample grids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PLANT = 0.068  # sqrt(abar_999) of SD's schedule: the size of the background leak the SD-shaped teacher had to resist


@dataclass(frozen=True)
class Prompt:
    kind: str
    seed: int
    source_prompt: str


def held_out_prompts(n: int) -> list[Prompt]:
    """`n` held-out captions per object count, those of `icd bench generation` (icd.bench.generation.prompt_cases
    from SEED_START["generation"] = EVAL_SEED_START + 100 000: seed = that + 100 000 j + i, object counts 1, 2)."""
    from icd import world

    out = []
    for j, k in enumerate((1, 2)):
        for i in range(n):
            seed = world.EVAL_SEED_START + 100_000 * (j + 1) + i
            out.append(Prompt("1-object" if k == 1 else "2-objects", seed,
                              world.sample_scene(seed, n_objects=k).caption))
    return out


def noise_for(seeds: list[int], size: int = 16) -> torch.Tensor:
    """Seeded starting noise [N, 4, size, size] (size: the latent side, 64 / the VAE factor)."""
    return torch.stack([torch.randn(4, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(pipe, prompts: list[str], noise: torch.Tensor, *, w: float, steps: int, text_length: int) -> np.ndarray:
    from icd.imageio import to_uint8
    from icd.models import flux_embedded as fe

    kwargs = dict(negative_prompt=[""] * len(prompts), true_cfg_scale=1.0 + w) if w > 0 else {}
    out = pipe(prompts, num_inference_steps=steps, height=64, width=64, max_sequence_length=text_length,
               latents=fe.pack(noise), output_type="pt", **kwargs).images
    return to_uint8(out * 2 - 1)


def grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    n = min(len(images), 32)
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * 66, cols * 66, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[r * 66 + 1 : r * 66 + 65, c * 66 + 1 : c * 66 + 65] = images[i]
    Image.fromarray(canvas).save(path)


def run_rows(pipe, judge, cases, *, w: float, steps: int, batch: int, text_length: int, noise_fn=None
             ) -> tuple[dict, np.ndarray]:
    from icd import world
    from icd.judge import attribute_accuracy

    images, t0 = [], time.perf_counter()
    for i in range(0, len(cases), batch):
        part = cases[i : i + batch]
        noise = noise_for([c.seed for c in part], 64 // pipe.vae_scale_factor)
        if noise_fn is not None:
            noise = noise_fn(noise, part)
        images.append(generate(pipe, [c.source_prompt for c in part], noise, w=w, steps=steps,
                               text_length=text_length))
    images = np.concatenate(images)
    scores = attribute_accuracy(judge.read(images), [world.parse_caption(c.source_prompt) for c in cases])
    scores["seconds"] = round(time.perf_counter() - t0, 1)
    return scores, images


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "src" / "icd" / "assets" / "embedded-flow")
    ap.add_argument("--guidance", default="0,1,2,4", help="guidance codes w (CFG scale 1 + w), comma-separated")
    ap.add_argument("--n-prompts", type=int, default=300)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-sequence-length", type=int, default=20,
                    help="T5 padding length (default: the trained 20; FluxPipeline's own default is 512)")
    ap.add_argument("--noise-test", type=int, default=0, metavar="N", help="planted-background check on N prompts")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "bench" / "embedded-flow")
    args = ap.parse_args()
    try:
        ws = [float(v) for v in args.guidance.split(",")]
    except ValueError:
        print(f"embedded_flow_teacher: error: --guidance must be comma-separated numbers, got {args.guidance!r}",
              file=sys.stderr)
        return 2
    if any(w < 0 for w in ws) or min(args.n_prompts, args.steps, args.batch) < 1 or \
            not 1 <= args.max_sequence_length <= 512:
        print("embedded_flow_teacher: error: --guidance >= 0; --n-prompts, --steps, --batch >= 1; "
              "--max-sequence-length in 1..512", file=sys.stderr)
        return 2
    if not (args.model / "model_index.json").is_file():
        print(f"embedded_flow_teacher: error: --model {args.model} is not a diffusers folder", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from diffusers import FluxPipeline

    from icd.judge import JudgeScorer

    pipe = FluxPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge = JudgeScorer.load()
    args.out.mkdir(parents=True, exist_ok=True)
    cases = held_out_prompts(args.n_prompts)
    by_kind = {k: [c for c in cases if c.kind == k] for k in dict.fromkeys(c.kind for c in cases)}
    rows = []
    for kind, kc in by_kind.items():
        for w in ws:
            scores, images = run_rows(pipe, judge, kc, w=w, steps=args.steps, batch=args.batch,
                                      text_length=args.max_sequence_length)
            rows.append({"prompts": kind, "w": w, "cfg": 1 + w, "steps": args.steps, **scores})
            grid(images, args.out / f"samples-{kind}-w{w:g}.png")
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": str(args.model), "max_sequence_length": args.max_sequence_length, "rows": rows}
    if args.noise_test:
        one = [r for r in rows if r["prompts"] == next(iter(by_kind))]
        w_best = max(one, key=lambda r: r["exact"])["w"]
        result["noise_test"] = noise_test(pipe, judge, by_kind[next(iter(by_kind))][: args.noise_test], w=w_best,
                                          steps=args.steps, batch=args.batch, text_length=args.max_sequence_length)
        print(json.dumps(result["noise_test"]), flush=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


@torch.no_grad()
def noise_test(pipe, judge, cases, *, w: float, steps: int, batch: int, text_length: int) -> list[dict]:
    from icd import world
    from icd.imageio import to_tensor

    names = list(world.BACKGROUNDS)
    flat = np.stack([np.full((64, 64, 3), world.BACKGROUNDS[b], np.uint8) for b in names])
    means = pipe.vae.encode(to_tensor(flat).to(pipe.vae.dtype)).latent_dist.mean.float()
    means = (means * pipe.vae.config.scaling_factor).mean(dim=(2, 3))  # [4 backgrounds, 4 channels]

    def planted(offset: int):
        def fn(noise, part):
            idx = [(names.index(world.parse_caption(c.source_prompt).background) + offset) % len(names) for c in part]
            return noise - noise.mean(dim=(2, 3), keepdim=True) + PLANT * means[idx][:, :, None, None]
        return fn

    out = []
    for label, fn in (("plain N(0, I)", None), ("means = the prompt's background", planted(0)),
                      ("means = another background", planted(1))):
        scores, _ = run_rows(pipe, judge, cases, w=w, steps=steps, batch=batch, text_length=text_length, noise_fn=fn)
        out.append({"noise": label, "n": len(cases), "w": w, "background": scores["background"],
                    "exact": scores["exact"]})
    return out


if __name__ == "__main__":
    sys.exit(main())
