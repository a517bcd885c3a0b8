"""`icd demo`: edit a held-out world image with 4+4 iCD steps on the embedded model; write out/demo.png."""

from __future__ import annotations

import os
import time

from icd import world
from icd.cli.catalog import DEFAULT_GUIDANCE
from icd.cli.common import CLIError, add_threads, library_errors, seed, start_compute
from icd.cli.world import check_out_folder
from icd.imageio import save_image
from icd.plotting import captioned_grid

DEMO_FILES = ("demo.png", "case/source.png", "case/target.png")


def cmd_demo(args) -> None:
    """Edit a held-out world image with 4+4 iCD steps on the embedded model; write out/demo.png."""
    out = check_out_folder(args.out)
    existing = [n for n in DEMO_FILES if os.path.lexists(out / n)]
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)} (use --force to overwrite)")
    case = world.make_case("color", world.EVAL_SEED_START + args.seed)
    start_compute(args)
    from icd.editing.controllers import P2PControls  # heavy (torch, diffusers): after the checks above
    from icd.editing.edit import EditControls  # as above
    from icd.metrics import psnr  # as above
    from icd.pipeline import Pipeline  # as above

    editor = Pipeline.from_pretrained(args.model)
    model = editor.model
    source = case.source[None]  # what out/case/source.png holds (PNG is lossless)
    old, new = case.blend_words
    with library_errors():  # an out-of-range --guidance
        editor.settings("icd", "edit", guidance=args.guidance)
        model.counter.reset()
        t0 = time.perf_counter()
        inversion = editor.invert(source, [case.source_prompt])
        t1 = time.perf_counter()
        result = editor.edit(inversion, [case.target_prompt],
                             EditControls(guidance=args.guidance, p2p=P2PControls(blend_words=((old,), (new,)))))
    t2 = time.perf_counter()
    edit, recon = result.images[0], result.reconstructions[0]
    background = float(psnr(source, edit[None], ~case.mask)[0])
    truth = float(psnr(case.target[None], edit[None])[0])
    grid = captioned_grid(
        [case.source, recon, edit, case.target],
        [f"source: {case.source_prompt}", f"iCD 4+4 reconstruction, {float(psnr(source, recon[None])[0]):.1f} dB",
         f"edit: {case.target_prompt}", f"rendered ground truth (edit: {truth:.1f} dB)"],
        cols=4, scale=4, text_lines=4)
    save_image(case.source, out / "case" / "source.png")
    save_image(case.target, out / "case" / "target.png")
    save_image(grid, out / "demo.png")
    print(f"edit '{old}' -> '{new}': {model.counter.calls} UNet calls ({model.counter.calls - result.nfe} invert + "
          f"{result.nfe} edit), {t2 - t0:.2f} s (invert {t1 - t0:.2f} s, edit {t2 - t1:.2f} s)")
    print(f"PSNR outside the edit mask {background:.2f} dB, against the rendered target {truth:.2f} dB")
    print(f"wrote {out / 'demo.png'}  (source | reconstruction | edit | ground truth)")


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="edit a world image with iCD on the embedded model and write out/demo.png")
    d.add_argument("--out", default="out")
    d.add_argument("--seed", type=seed, default=1, help="which held-out world case to edit")
    d.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE["edit"], help="guidance code w of the edit")
    d.add_argument("--model", default="embedded")
    d.add_argument("--force", action="store_true", help="overwrite the files of an earlier demo in --out")
    add_threads(d)
    d.set_defaults(func=cmd_demo)
