"""Copy trained runs into the package as the embedded flow model (docs/flow.md §4, §8).

usage:
  python scripts/ship_embedded_flow.py --teacher runs/flow-teacher/final
  python scripts/ship_embedded_flow.py --guidance runs/flow-guidance/final --icd runs/flow-icd/final

Writes src/icd/assets/embedded-flow/, a diffusers `FluxPipeline` folder. Each given component replaces its part and
the rest is kept: --teacher the pipeline (transformer and VAE in fp16 safetensors, both text encoders in fp32:
transformers >= 5 loads a model in the dtype its config.json records, diffusers loads the transformer in fp32, so
fp16 text encoders would break a plain `FluxPipeline.from_pretrained(folder)`; the tokenizers, the world vocabulary
and the trained T5 length), --guidance the guidance-distilled transformer (``transformer_guidance/``, fp16), --icd the
two iCD adapters (``icd/``, fp16). The folder is assembled beside the old one and swapped in by renames once its
total size is checked (<= 30 MB); over the limit nothing changes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from icd.io import atomic_directory, disk_mb

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "src" / "icd" / "assets" / "embedded-flow"
LIMIT_MB = 30


def _teacher(src: Path, dst: Path) -> None:
    from diffusers import FluxPipeline

    from icd import world
    from icd.models import flux_embedded as fe

    pipe = FluxPipeline.from_pretrained(src, torch_dtype=torch.float32)
    pipe.transformer.half()
    pipe.vae.half()
    parts = fe.FluxParts(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2, pipe.transformer)
    keep = {name: dst / name for name in ("transformer_guidance", "icd") if (dst / name).is_dir()}
    saved = {name: Path(shutil.move(str(path), str(dst.parent / f".keep-{name}"))) for name, path in keep.items()}
    shutil.rmtree(dst, ignore_errors=True)
    fe.save_pipeline(dst, parts=parts, vae=pipe.vae, vocabulary=world.vocabulary())
    for name, path in saved.items():
        path.rename(dst / name)


def _guidance(src: Path, dst: Path) -> None:
    from diffusers import FluxTransformer2DModel

    from icd.models.flux import GUIDANCE_SUBFOLDER

    net = FluxTransformer2DModel.from_pretrained(src / GUIDANCE_SUBFOLDER, torch_dtype=torch.float32).half()
    shutil.rmtree(dst / GUIDANCE_SUBFOLDER, ignore_errors=True)
    net.save_pretrained(dst / GUIDANCE_SUBFOLDER, safe_serialization=True)


def _icd(src: Path, dst: Path) -> None:
    from icd.models.lora import copy_adapters

    shutil.rmtree(dst / "icd", ignore_errors=True)
    # the shipped adapters sit on the shipped transformer_guidance/
    copy_adapters(src, dst / "icd", dtype=torch.float16, metadata={"teacher": "embedded-flow"})


def ship(parts: dict[str, Path], dst: Path = DEST) -> float:
    """Assemble the shipped folder from the given components (`parts`: teacher / guidance / icd folders) over the
    current one; returns its size in MB."""
    with atomic_directory(dst, from_current=True) as tmp:
        if "teacher" in parts:
            _teacher(parts["teacher"], tmp)
        if "guidance" in parts:
            _guidance(parts["guidance"], tmp)
        if "icd" in parts:
            _icd(parts["icd"], tmp)
        size = disk_mb(tmp)
        if size > LIMIT_MB:  # raised inside the block: nothing is swapped in
            raise SystemExit(f"ship_embedded_flow: error: {size:.1f} MB exceeds {LIMIT_MB} MB; nothing changed")
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, help="FluxPipeline folder of the trained teacher (runs/flow-teacher/final)")
    ap.add_argument("--guidance", type=Path, help="folder holding transformer_guidance/ (runs/flow-guidance/final)")
    ap.add_argument("--icd", type=Path, help="iCD adapters folder (runs/flow-icd/final)")
    ap.add_argument("--out", type=Path, default=DEST, help=f"destination folder (default {DEST.relative_to(ROOT)})")
    args = ap.parse_args()
    parts = {k: v for k, v in vars(args).items() if v is not None and k != "out"}
    if not parts:
        ap.error("name at least one component to ship (--teacher, --guidance, --icd)")
    checks = {"teacher": "model_index.json", "guidance": "transformer_guidance/config.json", "icd": "adapters.json"}
    for name, path in parts.items():
        if not (path / checks[name]).is_file():
            print(f"ship_embedded_flow: error: --{name} {path} lacks {checks[name]}", file=sys.stderr)
            return 2
    size = ship(parts, args.out)
    print(f"shipped {', '.join(parts)} into {args.out} ({size:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
