"""Copy the trained flow teacher into the package as the embedded flow model (docs/flow.md §4).

usage:
  python scripts/ship_embedded_flow.py --teacher runs/flow-teacher/final

Writes src/icd/assets/embedded-flow/, a diffusers `FluxPipeline` folder: transformer and VAE in fp16 safetensors,
both text encoders in fp32 (transformers >= 5 loads a model in the dtype its config.json records, diffusers loads the
transformer in fp32, so fp16 text encoders would break a plain `FluxPipeline.from_pretrained(folder)`), the
tokenizers, the world vocabulary and the trained T5 length. The folder is assembled beside the old one and swapped in
by renames once its total size is checked (<= 30 MB); over the limit nothing changes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "icd" / "assets" / "embedded-flow"
LIMIT_MB = 30


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def ship(src: Path, dst: Path = DEST) -> float:
    """Assemble the shipped folder from pipeline folder `src`; returns its size in MB."""
    from diffusers import FluxPipeline

    from icd import world
    from icd.models import flux_embedded as fe

    pipe = FluxPipeline.from_pretrained(src, torch_dtype=torch.float32)
    pipe.transformer.half()
    pipe.vae.half()
    parts = fe.FluxParts(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.transformer)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fe.save_pipeline(tmp, parts=parts, vae=pipe.vae, vocabulary=world.vocabulary())
    size = _size_mb(tmp)
    if size > LIMIT_MB:
        shutil.rmtree(tmp)
        raise SystemExit(f"ship_embedded_flow: error: {size:.1f} MB exceeds {LIMIT_MB} MB; nothing changed")
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="FluxPipeline folder (runs/flow-teacher/final)")
    ap.add_argument("--out", type=Path, default=DEST, help=f"destination folder (default {DEST.relative_to(ROOT)})")
    args = ap.parse_args()
    if not (args.teacher / "model_index.json").is_file():
        print(f"ship_embedded_flow: error: {args.teacher} is not a diffusers pipeline folder (no model_index.json)",
              file=sys.stderr)
        return 2
    size = ship(args.teacher, args.out)
    print(f"shipped {args.out} ({size:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
