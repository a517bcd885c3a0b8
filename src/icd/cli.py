"""The `icd` command line. Run `icd <command> --help` for each command's options and examples."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  icd world case --kind color --seed 3 --out out/case3
  icd world grid --n 16 -o out/grid.png
  icd generate "a large red circle on a gray background" --seed 0 --guidance 1 -o out/gen.png
  icd generate "a large red circle on a gray background" --method ddim --steps 50 --guidance 1 -o out/gen50.png
  icd invert out/case3/source.png --prompt "a small blue star on a brown background" -o out/recon.png --json
  icd invert out/case3/source.png --prompt "a small blue star on a brown background" --method ddim --steps 50 \\
      -o out/recon50.png
  icd edit out/case3/source.png --source "a small blue star on a brown background" \\
      --target "a small red star on a brown background" --blend blue red -o out/edit.png --grid out/grid.png --json
  icd train teacher --config configs/embedded.toml
  icd train icd --config configs/icd-ablation.toml --section G3
  icd bench editing --n 20 --methods icd,ddim50 --out out/bench/edit20
  icd bench inversion --n 200 --methods icd,ddim --steps-list 1,2,3,4,50 --out out/bench/inv
  torchrun --standalone --nproc_per_node 2 -m icd.cli bench generation --cases 100 --out out/bench/gen
"""


class CLIError(Exception):
    """An ordinary user mistake: reported in one line, exit code 2."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from icd.editing.tokens import AlignmentError
    from icd.imageio import ImageError
    from icd.models.base import PromptError
    from icd.models.embedded import ModelError
    from icd.solver import NumericsError
    from icd.train.checkpoint import CheckpointError
    from icd.train.config import ConfigError
    from icd.world import CaptionError

    return (CLIError, ImageError, PromptError, ModelError, ConfigError, CaptionError, AlignmentError,
            NumericsError, CheckpointError, FileNotFoundError)


# ----------------------------------------------------------------------------------------------- world


def cmd_world_case(args) -> None:
    import numpy as np

    from icd import world
    from icd.imageio import save_image

    case = world.make_case(args.kind, args.seed)
    out = Path(args.out)
    names = ["source.png", "target.png", "mask.png", "case.json"]
    existing = [n for n in names if (out / n).exists()]
    if existing and not args.force:
        raise CLIError(f"{out} already holds {', '.join(existing)} (use --force to overwrite)")
    save_image(case.source, out / "source.png")
    save_image(case.target, out / "target.png")
    save_image((case.mask.astype(np.uint8) * 255), out / "mask.png")
    from icd.train.checkpoint import write_text_atomic

    write_text_atomic(out / "case.json", json.dumps(case.metadata(), indent=1) + "\n")
    print(f"{case.kind} edit: {case.source_prompt!r} -> {case.target_prompt!r}; wrote {out}/")


def cmd_world_grid(args) -> None:
    from icd import world
    from icd.imageio import check_output, save_image
    from icd.plotting import captioned_grid

    check_output(args.output, force=args.force)
    scenes = [world.sample_scene(args.seed_start + i, max_objects=args.max_objects) for i in range(args.n)]
    grid = captioned_grid([world.render(s) for s in scenes], [s.caption for s in scenes], scale=args.scale)
    save_image(grid, args.output)
    print(f"wrote {args.output} ({args.n} scenes)")


# ----------------------------------------------------------------------------------------------- training


def cmd_train(args) -> None:
    from icd.train.config import load_config

    if args.component == "vae":
        from icd.train.vae import VAEConfig as Cfg
        from icd.train.vae import train_vae as run
    elif args.component == "icd":
        from icd.train.icd import ICDConfig as Cfg
        from icd.train.icd import train_icd as run
    elif args.component == "guidance":
        from icd.train.guidance import GuidanceConfig as Cfg
        from icd.train.guidance import train_guidance as run
    elif args.component == "judge":
        from icd.train.judge import JudgeConfig as Cfg
        from icd.train.judge import train_judge as run
    else:
        from icd.train.teacher import TeacherConfig as Cfg
        from icd.train.teacher import train_teacher as run
    cfg = load_config(Cfg, args.config, args.section or args.component, args.set or [])
    result = run(cfg, resume=not args.no_resume)
    print(result)


# ----------------------------------------------------------------------------------------------- sampling


def _load(args, method: str = "ddim"):
    import torch

    from icd.models.embedded import load_icd_model, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if method != "icd":
        return load_model(args.model)
    model = load_icd_model(args.model, adapters=getattr(args, "adapters", None))
    segments = model.icd.boundaries.num_segments
    if getattr(args, "steps", None) not in (None, segments):
        raise CLIError(f"the iCD adapters at {model.icd.path} take {segments} steps (got --steps {args.steps}); "
                       "other step counts need adapters trained with other boundaries")
    return model


def cmd_generate(args) -> None:
    from icd.imageio import check_output, save_image, to_uint8
    from icd.plotting import hstack
    from icd.sampling import generate, resolved_renoise

    check_output(args.output, force=args.force)
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    try:
        renoise = resolved_renoise(args.renoise, args.method, name="--renoise")
    except ValueError as e:
        raise CLIError(str(e)) from e
    model = _load(args, args.method)
    model.check_prompts([args.prompt])
    t0 = time.perf_counter()
    model.counter.reset()
    images = to_uint8(generate(model, [args.prompt] * args.n, seed=args.seed, steps=args.steps,
                               guidance=args.guidance, tau=args.tau, method=args.method, renoise=renoise))
    seconds = time.perf_counter() - t0
    save_image(hstack(list(images)), args.output)
    steps = model.icd.boundaries.num_segments if args.method == "icd" else args.steps or 50
    report = {"prompt": args.prompt, "method": args.method, "n": args.n, "steps": steps, "guidance": args.guidance,
              "tau": args.tau, "renoise": renoise, "nfe": model.counter.calls,
              "seconds": round(seconds, 3), "output": str(args.output)}
    summary = f"wrote {args.output} ({args.method}, {model.counter.calls} UNet calls, {seconds:.2f} s)"
    print(json.dumps(report) if args.json else summary)


def cmd_invert(args) -> None:
    import numpy as np

    from icd.editing.inversion import ddim_decode, ddim_invert, icd_decode, icd_invert
    from icd.imageio import check_output, fit_image, load_image, save_image, to_uint8
    from icd.metrics import psnr

    check_output(args.output, force=args.force, inputs=(args.image,))
    image = load_image(args.image)
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    model = _load(args, args.method)
    model.check_prompts([args.prompt])
    image = fit_image(image, model.image_size, args.fit)
    source = np.asarray(image)[None]
    t0 = time.perf_counter()
    model.counter.reset()
    cond = model.encode_prompt([args.prompt])
    z0 = model.encode_images(source)
    if args.method == "icd":
        boundaries = model.icd.boundaries
        inversion = icd_invert(model, z0, cond, [args.prompt], boundaries, seed=args.seed)
        t1 = time.perf_counter()
        tau = model.icd.tau if args.tau is None else args.tau
        z0_hat = icd_decode(model, inversion.noise, cond, boundaries, guidance=args.guidance, tau=tau)
    else:
        inversion = ddim_invert(model, z0, cond, [args.prompt], steps=args.steps or 50)
        t1 = time.perf_counter()
        tau = args.tau
        z0_hat = ddim_decode(model, inversion, cond, guidance=args.guidance, tau=tau)
    recon = to_uint8(model.decode_latents(z0_hat))  # NaN/Inf would have raised NumericsError in ddim_loop
    t2 = time.perf_counter()
    save_image(recon[0], args.output)
    report = {"method": args.method, "steps": len(inversion.timesteps) - 1, "guidance": args.guidance, "tau": tau,
              "nfe": model.counter.calls, "seconds_invert": round(t1 - t0, 4), "seconds_decode": round(t2 - t1, 4),
              "seconds": round(t2 - t0, 4), "psnr": round(float(psnr(source, recon)[0]), 3), "image": str(args.image),
              "output": str(args.output)}
    print(json.dumps(report) if args.json else
          f"wrote {args.output}: PSNR {report['psnr']:.2f} dB, {report['nfe']} UNet calls, {report['seconds']:.2f} s")


def _parse_reweight(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        word, sep, value = item.partition("=")
        try:
            out[word.strip().lower()] = float(value)
        except ValueError:
            raise CLIError(f"--reweight expects WORD=FACTOR, got {item!r}") from None
        if not sep or not word.strip():
            raise CLIError(f"--reweight expects WORD=FACTOR, got {item!r}")
    return out


def _blend_words(words: list[str] | None, source: str, target: str):
    if not words:
        return None
    src_words, tgt_words = source.lower().split(), target.lower().split()
    words = [w.lower() for w in words]
    unknown = [w for w in words if w not in src_words and w not in tgt_words]
    if unknown:
        raise CLIError(f"blend word(s) {', '.join(unknown)} appear in neither prompt")
    return tuple(w for w in words if w in src_words), tuple(w for w in words if w in tgt_words)


def cmd_edit(args) -> None:
    import numpy as np

    from icd.editing.controllers import MasaCtrlControls, P2PControls
    from icd.editing.editor import EditControls, Editor
    from icd.editing.inversion import Inversion
    from icd.editing.tokens import is_word_swap
    from icd.imageio import check_output, fit_image, load_image, save_image
    from icd.plotting import captioned_grid

    outputs = [args.output] + ([args.grid] if args.grid else [])
    for path in outputs:
        check_output(path, force=args.force, inputs=(args.image,))
    if not args.source.strip() or not args.target.strip():
        raise CLIError("the source or target prompt is empty")
    if args.masactrl and args.swap:
        raise CLIError("--masactrl and --swap are exclusive")
    image = load_image(args.image)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.model, adapters=args.adapters)
    model = editor.model
    image = np.asarray(fit_image(image, model.image_size, args.fit))[None]
    mask = None
    if args.mask:
        mask = (np.asarray(fit_image(load_image(args.mask), model.image_size, args.fit).convert("L")) > 127)
        if not mask.any():
            raise CLIError(f"the mask {args.mask} selects no pixels")
    p2p = None
    if not args.masactrl and not args.swap:
        if not is_word_swap(args.source, args.target):
            print("notice: the prompts have different word counts; using P2P refine instead of replace",
                  file=sys.stderr)
        p2p = P2PControls(cross_replace=args.cross_replace, self_replace=args.self_replace,
                          reweight=_parse_reweight(args.reweight), blend_words=_blend_words(args.blend, args.source,
                                                                                              args.target),
                          blend_threshold=args.blend_threshold, mask=None if mask is None else mask.astype(np.float32))
    masactrl = MasaCtrlControls(start_t=args.masactrl_start_t, start_layer=args.masactrl_layer) if args.masactrl \
        else None
    controls = EditControls(guidance=args.guidance, tau=args.tau, p2p=p2p, masactrl=masactrl)
    model.counter.reset()
    t0 = time.perf_counter()
    if args.inversion:
        inversion = Inversion.load(args.inversion)
        if inversion.prompts != [args.source]:
            raise CLIError(f"the saved inversion was made with the prompt {inversion.prompts[0]!r}, not --source")
    else:
        inversion = editor.invert(image, [args.source], method=args.method, steps=args.steps, seed=args.seed,
                                  guidance=args.guidance)
    t1 = time.perf_counter()
    result = editor.edit(inversion, [args.target], controls)
    t2 = time.perf_counter()
    if args.save_inversion:
        inversion.save(args.save_inversion)
    save_image(result.images[0], args.output)
    if args.grid:
        grid = captioned_grid([image[0], result.reconstructions[0], result.images[0]],
                              [f"source: {args.source}", f"reconstruction ({inversion.method})",
                               f"edit: {args.target}"], cols=3, scale=4, text_lines=4)
        save_image(grid, args.grid)
    report = {"method": inversion.method, "nfe": model.counter.calls, "nfe_invert": model.counter.calls - result.nfe,
              "nfe_edit": result.nfe, "seconds_invert": round(t1 - t0, 4), "seconds_edit": round(t2 - t1, 4),
              "seconds": round(t2 - t0, 4), "guidance": editor.default_guidance if args.guidance is None
              else args.guidance, "control": "masactrl" if masactrl else "p2p" if p2p else "swap",
              "output": str(args.output)}
    print(json.dumps(report) if args.json else
          f"wrote {args.output}: {report['method']} {report['control']}, {report['nfe']} UNet calls "
          f"({report['nfe_invert']} invert + {report['nfe_edit']} edit), {report['seconds']:.2f} s")


def cmd_demo(args) -> None:
    """Edit a held-out world image with 4+4 iCD steps on the embedded model; write out/demo.png."""
    import numpy as np

    from icd import world
    from icd.editing.controllers import P2PControls
    from icd.editing.editor import EditControls, Editor
    from icd.imageio import load_image, save_image
    from icd.metrics import psnr
    from icd.plotting import captioned_grid

    out = Path(args.out)
    case = world.make_case("color", world.EVAL_SEED_START + args.seed)
    save_image(case.source, out / "case" / "source.png")
    save_image(case.target, out / "case" / "target.png")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    editor = Editor.from_pretrained(args.model)
    model = editor.model
    source = np.asarray(load_image(out / "case" / "source.png"))[None]
    old, new = case.blend_words
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
    save_image(grid, out / "demo.png")
    print(f"edit '{old}' -> '{new}': {model.counter.calls} UNet calls ({model.counter.calls - result.nfe} invert + "
          f"{result.nfe} edit), {t2 - t0:.2f} s (invert {t1 - t0:.2f} s, edit {t2 - t1:.2f} s)")
    print(f"PSNR outside the edit mask {background:.2f} dB, against the rendered target {truth:.2f} dB")
    print(f"wrote {out / 'demo.png'}  (source | reconstruction | edit | ground truth)")


# ----------------------------------------------------------------------------------------------- parser


MAX_THREADS = 1024


def _threads(text: str) -> int:
    """--threads: 0 (torch's default) to MAX_THREADS; a huge count would crash the OpenMP runtime (found by fuzzing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must lie in 0..{MAX_THREADS}, got {value}")
    return value


def _adapters_arg(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--adapters takes NAME=DIR, got {item!r}")
        out[name] = path
    return out


def cmd_bench(args) -> None:
    from icd.bench import BenchOptions, run_bench

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        opts = BenchOptions(task=args.task, out=args.out, n=args.n, methods=args.methods, seed_start=args.seed_start,
                            kinds=args.kinds, steps_list=args.steps_list, adapters=_adapters_arg(args.adapters),
                            model=args.model, guidance=args.guidance, tau=args.tau, renoise=args.renoise,
                            batch=args.batch,
                            n_timing=args.n_timing, examples=args.examples, pie_bench=args.pie_bench,
                            lpips=args.lpips, clip=args.clip, dino=args.dino, device=args.device, force=args.force,
                            progress=not args.quiet)
        results = run_bench(opts)
    except (ValueError, FileExistsError) as e:  # bad options, unknown kinds or methods, a malformed PIE-Bench folder
        raise CLIError(str(e)) from e
    if not args.quiet:
        print(f"wrote {Path(args.out) / 'results.json'} ({len(results['methods'])} methods, {results['device']})")


def cmd_world_pie_bench(args) -> None:
    from icd.bench.piebench import write_fixture

    try:
        path = write_fixture(args.out, n_per_kind=args.n_per_kind)
    except ValueError as e:
        raise CLIError(str(e)) from e
    print(f"wrote a PIE-Bench-format fixture to {path}")


def build_parser() -> argparse.ArgumentParser:
    from icd import world
    from icd.imageio import FITS

    p = argparse.ArgumentParser(prog="icd", description="Invertible consistency distillation: fast text-guided "
                                "image editing with latent diffusion models.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("world", help="the synthetic shapes world: edit cases and sample grids")
    wsub = w.add_subparsers(dest="world_command", required=True, metavar="WHAT")
    case = wsub.add_parser("case", help="write one ground-truth edit case (source, target, mask, case.json)")
    case.add_argument("--kind", required=True, choices=world.EDIT_KINDS)
    case.add_argument("--seed", type=int, required=True)
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

    t = sub.add_parser("train", help="train a component of the embedded model from a TOML config")
    t.add_argument("component", choices=["vae", "judge", "teacher", "guidance", "icd"])
    t.add_argument("--config", required=True, help="TOML file with a table named after the component")
    t.add_argument("--section", default=None,
                   help="TOML table to read (default: the component's name), e.g. an ablation row")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in out_dir")
    t.set_defaults(func=cmd_train)

    def common(sp):
        sp.add_argument("--model", default="embedded", help="'embedded' or a diffusers pipeline folder")
        sp.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: default)")
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        sp.add_argument("--force", action="store_true", help="overwrite an existing output file")

    g = sub.add_parser("generate", help="text-to-image: 4-step iCD (default) or DDIM with classifier-free guidance")
    g.add_argument("prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--method", default="icd", choices=["icd", "ddim"],
                   help="icd: the reverse consistency model (one UNet call per segment); ddim: the teacher")
    g.add_argument("--steps", type=int, default=None,
                   help="icd: must equal the adapters' segment count (default); ddim: DDIM steps (default 50)")
    g.add_argument("--adapters", default=None, help="iCD adapters folder (default: <model>/icd)")
    g.add_argument("--guidance", type=float, default=1.0,
                   help="guidance code w = CFG scale - 1 (0: unguided; 1 is best on the embedded model)")
    g.add_argument("--tau", type=float, default=None, help="dynamic CFG threshold: no guidance while t/1000 > tau")
    g.add_argument("--renoise", type=float, default=None, metavar="GAMMA",
                   help="icd: re-noise each intermediate jump with fresh noise, strength in [0, 1] (default 1: "
                   "multistep consistency sampling, more exact captions; 0: the paper's deterministic jumps)")
    g.add_argument("--n", type=int, default=1, help="number of images (seeds seed..seed+n-1), side by side")
    g.add_argument("-o", "--output", required=True)
    common(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("invert", help="invert an image to noise and reconstruct it")
    i.add_argument("image")
    i.add_argument("--prompt", required=True, help="caption of the image (the source prompt)")
    i.add_argument("--method", default="icd", choices=["icd", "ddim"],
                   help="icd: forward then reverse consistency model (4+4 UNet calls); ddim: DDIM inversion")
    i.add_argument("--steps", type=int, default=None,
                   help="icd: must equal the adapters' segment count (default); ddim: steps each way (default 50)")
    i.add_argument("--adapters", default=None, help="iCD adapters folder (default: <model>/icd)")
    i.add_argument("--seed", type=int, default=0, help="icd: seed of the noise that takes the image to t = 19")
    i.add_argument("--guidance", type=float, default=0.0, help="guidance code w for the decoding pass")
    i.add_argument("--tau", type=float, default=None,
                   help="dynamic CFG threshold for the decoding pass (icd default: the adapters' tau)")
    i.add_argument("--fit", default="resize", choices=FITS, help="policy for non-square or other-size images")
    i.add_argument("-o", "--output", required=True)
    common(i)
    i.set_defaults(func=cmd_invert)
    e = sub.add_parser("edit", help="invert an image and regenerate it under a target prompt",
                       description="Invert IMAGE with the source prompt, then decode [source, target] in one batch "
                       "with Prompt-to-Prompt (default), MasaCtrl (--masactrl) or a plain prompt swap (--swap).")
    e.add_argument("image")
    e.add_argument("--source", required=True, help="caption of the image")
    e.add_argument("--target", required=True, help="the edited caption")
    e.add_argument("--method", default="icd", choices=["icd", "ddim", "npi", "nti"],
                   help="icd: 4+4 consistency models; ddim / npi / nti: baselines on the original UNet")
    e.add_argument("--steps", type=int, default=None, help="icd: the adapters' segment count; others: 50")
    e.add_argument("--adapters", default=None, help="iCD adapters folder (default: <model>/icd)")
    e.add_argument("--seed", type=int, default=0, help="icd: seed of the encoding noise")
    e.add_argument("--guidance", type=float, default=None, help="target guidance code w = CFG - 1 (default 1)")
    e.add_argument("--tau", type=float, default=None, help="dynamic CFG threshold (icd default: the adapters' tau)")
    e.add_argument("--cross-replace", type=float, default=0.3, help="P2P cross-attention window (fraction)")
    e.add_argument("--self-replace", type=float, default=0.6, help="P2P self-attention window (fraction)")
    e.add_argument("--blend", nargs="+", metavar="WORD", help="local blend words (from either prompt)")
    e.add_argument("--blend-threshold", type=float, default=0.3)
    e.add_argument("--reweight", action="append", metavar="WORD=F", help="scale a target word's attention")
    e.add_argument("--mask", default=None, help="user mask image (white = may change) instead of blend words")
    e.add_argument("--masactrl", action="store_true", help="MasaCtrl mutual self-attention (non-rigid edits)")
    e.add_argument("--masactrl-start-t", type=int, default=920, help="MasaCtrl acts at t <= this")
    e.add_argument("--masactrl-layer", type=int, default=None, help="first controlled block (default: decoder)")
    e.add_argument("--swap", action="store_true", help="plain prompt swap without attention control")
    e.add_argument("--fit", default="resize", choices=FITS, help="policy for non-square or other-size images")
    e.add_argument("--save-inversion", default=None, metavar="PATH", help="save the inversion for reuse")
    e.add_argument("--inversion", default=None, metavar="PATH", help="reuse a saved inversion (4 NFE per edit)")
    e.add_argument("--grid", default=None, help="also write source | reconstruction | edit")
    e.add_argument("-o", "--output", required=True)
    common(e)
    e.set_defaults(func=cmd_edit)

    b = sub.add_parser("bench", help="measure methods side by side: inversion, editing or generation tables",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  icd bench editing --n 20 --methods icd,ddim50 --out out/bench/edit20
  icd bench editing --n 100 --methods icd,ddim50,ddim4,npi50,nti50 --out out/bench/editing
  icd bench inversion --n 200 --methods icd,ddim --steps-list 1,2,3,4,50 --out out/bench/steps
  icd bench inversion --n 200 --methods icd:G3,icd --adapters G3=runs/ablation/G3/final --out out/bench/g3
  icd bench generation --n 100 --methods icd,gddim50,ddim50 --out out/bench/gen
  icd bench editing --pie-bench PIE-Bench_v1 --n 20 --out out/bench/pie
methods: icd, icd:NAME (with --adapters NAME=DIR), ddimK (original UNet, two-pass CFG), gddimK (guidance-distilled
UNet), npiK, ntiK; a family without K takes 50 steps or each of --steps-list. Multi-process: run the same
command under `accelerate launch` or `torchrun`; cases are sharded and gathered into one results.json.""")
    b.add_argument("task", choices=("inversion", "editing", "generation"))
    b.add_argument("--out", required=True, help="folder for results.json, results.md, plots and examples")
    b.add_argument("--n", "--cases", dest="n", type=int, default=20,
                   help="cases per kind (editing, generation) or images (inversion); under torchrun write --cases")
    b.add_argument("--methods", default=None, help="comma-separated (default: icd,ddim50,ddim4 | "
                   "icd,ddim50,ddim4,npi50,nti50 | icd,gddim50,ddim50)")
    b.add_argument("--seed-start", type=int, default=None, help="first world seed (default: a held-out range)")
    b.add_argument("--kinds", default=None, help="editing: comma-separated edit kinds (world: "
                   f"{','.join(world.EDIT_KINDS)}; PIE-Bench: its editing types)")
    b.add_argument("--steps-list", default=None, metavar="K,K,…", help="step ablation for families without K")
    b.add_argument("--adapters", action="append", metavar="NAME=DIR", help="extra iCD adapters, method icd:NAME")
    b.add_argument("--model", default="embedded", help="model folder (default: the embedded model)")
    b.add_argument("--guidance", type=float, default=None, help="code w = CFG - 1 (default 1; inversion: 0)")
    b.add_argument("--tau", type=float, default=None,
                   help="dynamic-CFG threshold (default: the adapters' tau for icd inversion and editing; "
                   "none for generation, as in `icd generate`)")
    b.add_argument("--renoise", type=float, default=None, metavar="GAMMA",
                   help="generation: icd methods' re-noising strength, as `icd generate --renoise` (default 1; "
                   "0: the paper's deterministic jumps)")
    b.add_argument("--batch", type=int, default=50, help="cases per batched model call")
    b.add_argument("--n-timing", type=int, default=5, help="single-image runs timed per method")
    b.add_argument("--examples", type=int, default=2, help="example cases per kind in examples.png")
    b.add_argument("--pie-bench", default=None, metavar="PATH", help="PIE-Bench folder (mapping_file.json, "
                   "annotation_images/) instead of world cases")
    b.add_argument("--lpips", default=None, metavar="PATH", help="LPIPS weights (AlexNet + v0.1 linear layers)")
    b.add_argument("--clip", default=None, metavar="DIR", help="local CLIP model folder (CLIP-T, CLIP-I)")
    b.add_argument("--dino", default=None, metavar="DIR", help="local DINOv2 model folder")
    b.add_argument("--device", default="auto", help="auto (the launcher's device, else cuda if present), cpu, cuda")
    b.add_argument("--force", action="store_true", help="replace results already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    b.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: default)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="edit a world image with iCD on the embedded model and write out/demo.png")
    d.add_argument("--out", default="out")
    d.add_argument("--seed", type=int, default=1, help="which held-out world case to edit")
    d.add_argument("--guidance", type=float, default=1.0, help="guidance code w of the edit")
    d.add_argument("--model", default="embedded")
    d.add_argument("--threads", type=_threads, default=0, help="torch CPU threads (0: default)")
    d.set_defaults(func=cmd_demo)
    return p


def _quiet_libraries() -> None:
    """Keep transformers / diffusers to errors and drop their weight-loading progress bars (CLI only)."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        _quiet_libraries()
    try:
        args.func(args)
    except _user_errors() as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"icd: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icd: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
