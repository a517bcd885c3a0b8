"""Copy trained runs into the package as the embedded model (safetensors: fp16, the text encoder fp32).

usage:
  python scripts/ship_embedded.py --teacher runs/teacher/final --judge runs/judge/judge.safetensors
  python scripts/ship_embedded.py --guidance runs/guidance/final --icd runs/icd/final
  python scripts/ship_embedded.py --icd runs/ablation/R64_cos_r05/final --icd-rank 28

Each given component replaces its part of src/icd/assets/ and the rest is kept: --teacher the whole pipeline
(tokenizer, text encoder, VAE, teacher UNet), --judge the judge, --guidance the guidance-distilled UNet
(``unet_guidance/``), --icd the two iCD adapters (``icd/``). The new folder is assembled beside the old one and
swapped in by renames once its total size is checked (<= 30 MB); over the limit nothing changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from icd.io import atomic_directory, disk_mb

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "icd" / "assets"
LIMIT_MB = 30


class OverLimit(Exception):
    """The assembled assets would exceed LIMIT_MB (args[0]: their size in MB)."""


def _teacher(src: Path, dst: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from icd import world
    from icd.models.tiny import VOCABULARY_FILE, write_tokenizer_files

    pipe = StableDiffusionPipeline.from_pretrained(src, safety_checker=None, torch_dtype=torch.float32)
    # The text encoder stays fp32 (0.4 MB): transformers >= 5 loads a model in the dtype its config.json records,
    # while diffusers loads the UNet in fp32, so an fp16 text encoder breaks a plain `from_pretrained(folder)`.
    for module in (pipe.unet, pipe.vae):
        module.half()
    keep = {name: dst / name for name in ("unet_guidance", "icd") if (dst / name).is_dir()}
    saved = {name: Path(shutil.move(str(path), str(dst.parent / f".keep-{name}"))) for name, path in keep.items()}
    shutil.rmtree(dst, ignore_errors=True)
    pipe.save_pretrained(dst, safe_serialization=True)
    write_tokenizer_files(dst / "tokenizer", world.vocabulary())
    (dst / VOCABULARY_FILE).write_text(json.dumps(world.vocabulary()) + "\n")
    for name, path in saved.items():
        path.rename(dst / name)


def _guidance(src: Path, dst: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(src / "unet_guidance", torch_dtype=torch.float32).half()
    shutil.rmtree(dst / "unet_guidance", ignore_errors=True)
    unet.save_pretrained(dst / "unet_guidance", safe_serialization=True)


def _icd(src: Path, dst: Path, rank: int | None = None) -> None:
    from icd.models.lora import copy_adapters

    shutil.rmtree(dst / "icd", ignore_errors=True)
    # rank: SVD-truncated, alpha / rank unchanged; the shipped adapters sit on the shipped unet_guidance/
    copy_adapters(src, dst / "icd", rank=rank, dtype=torch.float16, metadata={"teacher": "embedded"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, help="pipeline folder of the trained teacher (runs/teacher/final)")
    ap.add_argument("--judge", type=Path, help="judge weights (runs/judge/judge.safetensors)")
    ap.add_argument("--guidance", type=Path, help="folder holding unet_guidance/ (runs/guidance/final)")
    ap.add_argument("--icd", type=Path, help="iCD adapters folder (runs/icd/final)")
    ap.add_argument("--icd-rank", type=int, metavar="K",
                    help="ship the iCD adapters cut to rank K by SVD (to fit the size limit)")
    args = ap.parse_args()
    icd_rank = args.icd_rank
    parts = {k: v for k, v in vars(args).items() if v is not None and k != "icd_rank"}
    if icd_rank is not None and "icd" not in parts:
        ap.error("--icd-rank needs --icd")
    if not parts:
        ap.error("name at least one component to ship")
    checks = {"teacher": "model_index.json", "judge": "", "guidance": "unet_guidance", "icd": "adapters.json"}
    for name, path in parts.items():
        if not (path / checks[name]).exists():
            print(f"error: --{name} {path} lacks {checks[name] or 'the file'}", file=sys.stderr)
            return 2
    if icd_rank is not None:
        from icd.models.lora import truncated_metadata

        try:
            truncated_metadata(json.loads((parts["icd"] / "adapters.json").read_text()), icd_rank)
        except ValueError as e:
            print(f"error: --icd-rank {e}", file=sys.stderr)
            return 2
    final = ASSETS / "embedded"
    try:
        with atomic_directory(final, from_current=True) as tmp:
            if "teacher" in parts:
                _teacher(parts["teacher"], tmp)
            if "guidance" in parts:
                _guidance(parts["guidance"], tmp)
            if "icd" in parts:
                _icd(parts["icd"], tmp, icd_rank)
            total = disk_mb(tmp) + disk_mb(parts.get("judge", ASSETS / "judge.safetensors")) + sum(
                disk_mb(p) for p in ASSETS.iterdir() if p.name not in {"embedded", tmp.name, "judge.safetensors"})
            if total > LIMIT_MB:  # raised inside the block: nothing is swapped in, the shipped assets stay
                raise OverLimit(total)
    except OverLimit as e:
        print(f"error: the new embedded assets would take {e.args[0]:.1f} MB, over the {LIMIT_MB} MB limit "
              "(nothing was changed; try a smaller --icd-rank)", file=sys.stderr)
        return 1
    if "judge" in parts:
        shutil.copyfile(parts["judge"], ASSETS / "judge.safetensors.tmp")
        (ASSETS / "judge.safetensors.tmp").rename(ASSETS / "judge.safetensors")
    print(f"shipped {', '.join(parts)} into {final}: assets now {disk_mb(ASSETS):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
