"""`icd world case | grid | pie-bench | dataset`: the synthetic shapes world."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from icd import world
from icd.bench.piebench import write_fixture
from icd.cli.common import CLIError, seed
from icd.imageio import check_output, save_image
from icd.io import atomic_directory, folder_problem, write_text_atomic
from icd.plotting import captioned_grid

CASE_FILES = ["source.png", "target.png", "mask.png", "case.json"]


def check_out_folder(out: str, flag: str = "--out") -> Path:
    """An output folder that can be written (created if missing), before any work; else a one-line CLIError."""
    if not out.strip():
        raise CLIError(f"{flag} must name a folder")
    problem = folder_problem(out)
    if problem:
        raise CLIError(f"{flag} {out}: {problem}")
    return Path(out)


def cmd_world_case(args) -> None:
    out = check_out_folder(args.out)
    existing = [n for n in CASE_FILES if os.path.lexists(out / n)]
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)} (use --force to overwrite)")
    case = world.make_case(args.kind, args.seed)
    save_image(case.source, out / "source.png")
    save_image(case.target, out / "target.png")
    save_image((case.mask.astype(np.uint8) * 255), out / "mask.png")
    write_text_atomic(out / "case.json", json.dumps(case.metadata(), indent=1) + "\n")
    print(f"{case.kind} edit: {case.source_prompt!r} -> {case.target_prompt!r}; wrote {out}/")


MAX_GRID_SCENES = 1024  # 1 024 scenes at scale 3 are ~40 MP with captions (100 000 was killed for memory)
MAX_GRID_SCALE = 16


def cmd_world_grid(args) -> None:
    if not 1 <= args.n <= MAX_GRID_SCENES:
        raise CLIError(f"--n must lie in 1..{MAX_GRID_SCENES}, got {args.n}")
    if not 1 <= args.scale <= MAX_GRID_SCALE:
        raise CLIError(f"--scale must lie in 1..{MAX_GRID_SCALE}, got {args.scale}")
    if args.seed_start < 0:
        raise CLIError(f"--seed-start must be >= 0 (world seeds), got {args.seed_start}")
    check_output(args.output, force=args.force)
    scenes = [world.sample_scene(args.seed_start + i, max_objects=args.max_objects) for i in range(args.n)]
    grid = captioned_grid([world.render(s) for s in scenes], [s.caption for s in scenes], scale=args.scale)
    save_image(grid, args.output)
    print(f"wrote {args.output} ({args.n} scenes)")


def cmd_world_pie_bench(args) -> None:
    check_out_folder(args.out, "the fixture folder")
    try:
        path = write_fixture(args.out, n_per_kind=args.n_per_kind)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(f"wrote a PIE-Bench-format fixture to {path}")


MAX_DATASET = 100_000  # 64x64 PNGs: ~5 KB each


def cmd_world_dataset(args) -> None:
    """World renders as a Hugging Face ``imagefolder`` (NNNNN.png + metadata.jsonl with file_name and text): the
    training-data layout of docs/training.md, written atomically into a new folder."""
    if not 1 <= args.n <= MAX_DATASET:
        raise CLIError(f"--n must lie in 1..{MAX_DATASET}, got {args.n}")
    if args.seed_start < 0:
        raise CLIError(f"--seed-start must be >= 0 (world seeds), got {args.seed_start}")
    out = check_out_folder(args.out)
    if os.path.lexists(out):
        raise CLIError(f"--out {out} already exists (a dataset is written into a new folder)")
    rows = []
    with atomic_directory(out) as tmp:
        for i in range(args.n):
            scene = world.sample_scene(args.seed_start + i, max_objects=args.max_objects)
            name = f"{i:05d}.png"
            save_image(world.render(scene), tmp / name)
            rows.append(json.dumps({"file_name": name, "text": scene.caption}))
        write_text_atomic(tmp / "metadata.jsonl", "\n".join(rows) + "\n")
    print(f"wrote {args.n} images and metadata.jsonl to {out}/")


def add_parser(sub) -> None:
    w = sub.add_parser("world", help="the synthetic shapes world: edit cases and sample grids")
    wsub = w.add_subparsers(dest="world_command", required=True, metavar="WHAT")
    case = wsub.add_parser("case", help="write one ground-truth edit case (source, target, mask, case.json)")
    case.add_argument("--kind", required=True, choices=world.EDIT_KINDS)
    case.add_argument("--seed", type=seed, required=True)
    case.add_argument("--out", required=True, help="output folder")
    case.add_argument("--force", action="store_true", help="overwrite existing files")
    case.set_defaults(func=cmd_world_case)

    grid = wsub.add_parser("grid", help="a grid of sample scenes with their captions")
    grid.add_argument("--n", type=int, default=16)
    grid.add_argument("--seed-start", type=int, default=world.EVAL_SEED_START)
    grid.add_argument("--max-objects", type=int, default=2, choices=[1, 2, 3])
    grid.add_argument("--scale", type=int, default=3, help="pixel magnification")
    grid.add_argument("-o", "--output", required=True)
    grid.add_argument("--force", action="store_true")
    grid.set_defaults(func=cmd_world_grid)

    pb = wsub.add_parser("pie-bench", help="write world edit cases in PIE-Bench's layout (a test fixture)")
    pb.add_argument("out", help="new folder")
    pb.add_argument("--n-per-kind", type=int, default=2)
    pb.set_defaults(func=cmd_world_pie_bench)

    ds = wsub.add_parser("dataset", help="write world renders as an image folder with captions (training data)")
    ds.add_argument("--n", type=int, required=True)
    ds.add_argument("--seed-start", type=int, default=0, help="first world seed (the training seeds start at 0)")
    ds.add_argument("--max-objects", type=int, default=2, choices=[1, 2, 3])
    ds.add_argument("--out", required=True, help="new folder")
    ds.set_defaults(func=cmd_world_dataset)
