"""Copy trained runs into the package as the embedded model (fp16 safetensors).

usage: python scripts/ship_embedded.py [--teacher runs/teacher/final] [--judge runs/judge/judge.safetensors]

Writes src/icd/assets/embedded/ (a diffusers StableDiffusionPipeline folder) and src/icd/assets/judge.safetensors,
through a temporary folder and a rename, and checks the total size (<= 30 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "icd" / "assets"
LIMIT_MB = 30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/teacher/final")
    ap.add_argument("--judge", default="runs/judge/judge.safetensors")
    args = ap.parse_args()
    from diffusers import StableDiffusionPipeline

    from icd import world
    from icd.models.tiny import VOCABULARY_FILE, write_tokenizer_files

    src = Path(args.teacher)
    if not (src / "model_index.json").is_file():
        print(f"error: not a pipeline folder: {src}", file=sys.stderr)
        return 2
    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, torch_dtype=torch.float32)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.half()
    tmp = ASSETS / "embedded.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer_files(tmp / "tokenizer")
    (tmp / VOCABULARY_FILE).write_text(json.dumps(world.vocabulary()) + "\n")
    final = ASSETS / "embedded"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if args.judge:
        shutil.copyfile(args.judge, ASSETS / "judge.safetensors.tmp")
        (ASSETS / "judge.safetensors.tmp").rename(ASSETS / "judge.safetensors")
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file()) / 2**20
    print(f"shipped {final} and the judge: {total:.1f} MB")
    if total > LIMIT_MB:
        print(f"error: embedded assets exceed {LIMIT_MB} MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
