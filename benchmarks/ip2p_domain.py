"""Why does IP2P fit its training triples but rarely make held-out edits? A 2 x 2 on caption pairs whose exact
renders exist (docs/experiments/ip2p.md §6c): rows are the pairs IP2P trained on and unseen pairs (a fresh triple set,
generated and judge-filtered the same way, from seeds no IP2P run uses); columns are the source IP2P reads, the
teacher's generated image (what it trained on) or the world's exact render of the same caption (what `icd bench
editing` gives it). Each cell: the judge's exact-caption accuracy of the edit against the target caption (as the
bench's judge %), of the source against the source caption, and the edit's PSNR against the source it read.

    python benchmarks/ip2p_domain.py --ip2p runs/ip2p-long/final --triples runs/ip2p/triples \
        --unseen runs/ip2p/triples-unseen --n 112 --json out/ref/ip2p_domain.json

--unseen is generated first when missing (4 chunks of 32 from seed 2 000 000: ~6 min on one thread; resumable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from icd import world
from icd.editing import ip2p
from icd.imageio import to_uint8
from icd.io import write_text_atomic
from icd.judge import JudgeScorer
from icd.metrics import psnr
from icd.pipeline import Pipeline
from icd.samplers import initial_noise
from icd.train.ip2p_data import Triples, TripleSpec, generate_triples, load_triples

UNSEEN_SEED_START = 2_000_000  # above every configured triple set (configs/embedded.toml: seeds 0 .. 5 119 at most)


def renders(data: Triples, idx: list[int]) -> np.ndarray:
    """The world's exact source renders of pairs `idx` (uint8 [N, H, W, 3]); checks the captions agree."""
    out = []
    for i in idx:
        case = world.make_case(data.kinds[i], data.seeds[i])
        if (case.source_prompt, case.target_prompt) != (data.source_captions[i], data.target_captions[i]):
            raise SystemExit(f"seed {data.seeds[i]} ({data.kinds[i]}): the world's captions differ from the triple's")
        out.append(case.source)
    return np.stack(out)


@torch.no_grad()
def cell(model: ip2p.IP2PModel, base, judge: JudgeScorer, z_src: torch.Tensor, data: Triples, idx: list[int], *,
         steps: int, s_t: float, s_i: float) -> dict:
    texts = [data.instruction(i) for i in idx]
    noise = initial_noise(z_src.shape[1:], list(range(len(idx))), z_src.device)
    edited = to_uint8(base.decode_latents(model.sample(z_src, texts, noise, steps=steps, text_guidance=s_t,
                                                       image_guidance=s_i, schedule=base.schedule)))
    source = to_uint8(base.decode_latents(z_src))
    return {"n": len(idx),
            "judge_target": judge.score(edited, [data.target_captions[i] for i in idx])["exact"],
            "judge_source_input": judge.score(source, [data.source_captions[i] for i in idx])["exact"],
            "psnr_vs_source": float(psnr(edited, source).mean())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ip2p", required=True, help="a trained IP2P folder")
    ap.add_argument("--triples", required=True, help="the triple set it trained on")
    ap.add_argument("--chunks", type=int, default=40, help="chunks of 32 in --triples (configs/embedded.toml)")
    ap.add_argument("--unseen", required=True, help="the unseen triple set (generated when missing)")
    ap.add_argument("--unseen-chunks", type=int, default=4)
    ap.add_argument("--n", type=int, default=112, help="pairs per row")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained()
    base = pipe.base()
    unseen_spec = TripleSpec(n_chunks=args.unseen_chunks, chunk=32, seed_start=UNSEEN_SEED_START)
    generate_triples(pipe, args.unseen, unseen_spec)
    model = ip2p.IP2PModel.load(args.ip2p, model=base)
    s_t, s_i = model.guidance(ip2p.IP2PControls())
    judge = JudgeScorer.load()
    report = {"ip2p": args.ip2p, "steps": args.steps, "text_guidance": s_t, "image_guidance": s_i, "rows": {}}
    for row, data in (("trained", load_triples(args.triples, TripleSpec(n_chunks=args.chunks, chunk=32))),
                      ("unseen", load_triples(args.unseen, unseen_spec))):
        idx = data.spread(args.n)
        sources = {"generated": data.source[idx].to(base.device),
                   "render": base.encode_images(renders(data, idx)).float()}
        report["rows"][row] = {col: cell(model, base, judge, z, data, idx, steps=args.steps, s_t=s_t, s_i=s_i)
                               for col, z in sources.items()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, text + "\n")
    return report


if __name__ == "__main__":
    main()
