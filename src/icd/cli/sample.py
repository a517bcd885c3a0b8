"""`icd generate` (text-to-image) and `icd invert` (image -> noise -> image), iCD or DDIM."""

from __future__ import annotations

import json

import numpy as np

from icd.cli.catalog import DEFAULT_GUIDANCE, DEFAULT_RENOISE
from icd.cli.common import (
    MAX_SEED,
    CLIError,
    add_model_options,
    fit_to_model,
    library_errors,
    load_pipeline,
    numerics_named,
    seed,
)
from icd.imageio import FITS, check_output, load_image, save_image
from icd.methods import REGISTRY  # light: the menus
from icd.plotting import hstack

MAX_IMAGES = 256  # images side by side in one output file


def cmd_generate(args) -> None:
    check_output(args.output, force=args.force)
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    if not 1 <= args.n <= MAX_IMAGES or args.seed + args.n - 1 > MAX_SEED:
        raise CLIError(f"--n must lie in 1..{MAX_IMAGES} with --seed + --n - 1 <= 2^64-1, got --n {args.n}")
    pipe = load_pipeline(args)
    with library_errors():  # bad --steps / --renoise for this method and these adapters
        pipe.settings(args.method, "generate", guidance=args.guidance, tau=args.tau, steps=args.steps,
                      renoise=args.renoise)
    model = pipe.model_for(args.method)
    model.check_prompts([args.prompt])
    with numerics_named(model):
        result = pipe.generate([args.prompt] * args.n, method=args.method, steps=args.steps, guidance=args.guidance,
                               tau=args.tau, renoise=args.renoise, seed=args.seed)
    save_image(hstack(list(result.uint8())), args.output)
    st = result.settings
    report = {"prompt": args.prompt, "method": args.method, "n": args.n, "steps": st.steps, "guidance": st.guidance,
              "tau": st.tau, "renoise": st.renoise, "nfe": result.nfe, "seconds": round(result.seconds, 3),
              "output": str(args.output), "settings": st.as_dict()}
    summary = f"wrote {args.output} ({args.method}, {result.nfe} UNet calls, {result.seconds:.2f} s)"
    print(json.dumps(report) if args.json else summary)


def cmd_invert(args) -> None:
    check_output(args.output, force=args.force, inputs=(args.image,))
    image = load_image(args.image)
    if not args.prompt.strip():
        raise CLIError("the prompt is empty")
    pipe = load_pipeline(args)
    with library_errors():  # a --steps the adapters cannot take, an out-of-range --guidance / --tau
        pipe.settings(args.method, "invert", guidance=args.guidance, tau=args.tau, steps=args.steps)
    model = pipe.model_for(args.method)
    model.check_prompts([args.prompt])
    source = np.asarray(fit_to_model(image, model, args.fit))[None]
    model.counter.reset()
    with numerics_named(model):
        r = pipe.reconstruct(source, [args.prompt], method=args.method, steps=args.steps, guidance=args.guidance,
                             tau=args.tau, seed=args.seed, ddim_rule=args.ddim_rule)
    save_image(r.images[0], args.output)
    from icd.metrics import psnr  # imports torch: loaded with the pipeline already
    seconds = r.seconds_invert + r.seconds_decode
    report = {"method": args.method, "steps": r.settings.steps, "guidance": r.settings.guidance,
              "tau": r.settings.tau, "nfe": r.nfe_invert + r.nfe_decode, "seconds_invert": round(r.seconds_invert, 4),
              "seconds_decode": round(r.seconds_decode, 4), "seconds": round(seconds, 4),
              "psnr": round(float(psnr(source, r.images)[0]), 3), "image": str(args.image), "output": str(args.output),
              "nfe_invert": r.nfe_invert, "nfe_decode": r.nfe_decode, "settings": r.settings.as_dict()}
    print(json.dumps(report) if args.json else
          f"wrote {args.output}: PSNR {report['psnr']:.2f} dB, {report['nfe']} UNet calls, {report['seconds']:.2f} s")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="text-to-image: 4-step iCD (default) or DDIM with classifier-free guidance")
    g.add_argument("prompt")
    g.add_argument("--seed", type=seed, default=0)
    g.add_argument("--method", default="icd", choices=REGISTRY.names("generate"),
                   help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.menu("generate")))
    g.add_argument("--steps", type=int, default=None,
                   help="icd: must equal the adapters' segment count (default); ddim / gddim: DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance code w = CFG scale - 1 (0: unguided; default "
                   f"{DEFAULT_GUIDANCE['generate']:g}, the best on the embedded model; SD 1.5 / SDXL: 7)")
    g.add_argument("--tau", type=float, default=None, help="dynamic CFG threshold: no guidance while t/1000 > tau")
    g.add_argument("--renoise", type=float, default=None, metavar="GAMMA",
                   help="icd: re-noise each intermediate jump with fresh noise, strength in [0, 1] "
                   f"(default {DEFAULT_RENOISE:g}: multistep consistency sampling, more exact captions; 0: the paper's "
                   "deterministic jumps)")
    g.add_argument("--n", type=int, default=1, help="number of images (seeds seed..seed+n-1), side by side")
    g.add_argument("-o", "--output", required=True)
    add_model_options(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("invert", help="invert an image to noise and reconstruct it")
    i.add_argument("image")
    i.add_argument("--prompt", required=True, help="caption of the image (the source prompt)")
    i.add_argument("--method", default="icd", choices=REGISTRY.names("reconstruct"),
                   help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.menu("reconstruct")))
    i.add_argument("--steps", type=int, default=None,
                   help="icd: must equal the adapters' segment count (default); ddim: steps each way (default 50)")
    i.add_argument("--seed", type=seed, default=0, help="icd: seed of the noise that takes the image to t = 19")
    i.add_argument("--guidance", type=float, default=None,
                   help=f"guidance code w for the decoding pass (default {DEFAULT_GUIDANCE['invert']:g})")
    i.add_argument("--tau", type=float, default=None,
                   help="dynamic CFG threshold for the decoding pass (icd default: the adapters' tau)")
    i.add_argument("--fit", default=None, choices=FITS,
                   help="policy for photos of other sizes (default: resize to the embedded model's square; "
                   "aspect for Stable Diffusion)")
    i.add_argument("-o", "--output", required=True)
    add_model_options(i)
    i.set_defaults(func=cmd_invert)
