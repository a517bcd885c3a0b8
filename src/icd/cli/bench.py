"""`icd bench inversion | editing | generation | guidance`: methods side by side, written to results.json /
results.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from icd import world
from icd.cli import catalog
from icd.cli.common import CLIError, add_compile, add_threads, start_compute

EPILOG = """examples:
  icd bench editing --n 20 --methods icd,ddim50 --out out/bench/edit20
  icd bench editing --n 100 --methods icd,ddim50,ddim4,npi50,nti50 --out out/bench/editing
  icd bench inversion --n 200 --methods icd,ddim --steps-list 1,2,3,4,50 --out out/bench/steps
  icd bench inversion --n 200 --methods icd:G3,icd --adapters G3=runs/ablation/G3/final --out out/bench/g3
  icd bench generation --n 100 --methods icd,gddim50,ddim50 --out out/bench/gen
  icd bench inversion --n 200 --methods vae,ddim50 --out out/bench/vae        # the autoencoder's ceiling
  icd bench guidance --n 256 --guidance 2 --out out/bench/guidance-w2        # distilled UNet vs two-pass CFG
  icd bench editing --pie-bench PIE-Bench_v1 --n 20 --methods icd,ddim50 --out out/bench/pie
methods: icd, icd:NAME (with --adapters NAME=DIR), ddimK (original UNet, two-pass CFG), gddimK (guidance-distilled
UNet), npiK, ntiK, sdeditK@S / sdedit-icd@S (editing: SDEdit from strength S), ip2pK (editing: InstructPix2Pix,
K DDIM steps; --ip2p DIR), vae (inversion: encode + decode only); a family without K takes 50 steps (ip2p: 100) or
each of
--steps-list. Multi-process: run the same command under `accelerate launch` or `torchrun`; cases are sharded and
gathered into one results.json."""


def _adapters_arg(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--adapters takes NAME=DIR, got {item!r}")
        out[name] = path
    return out


def cmd_bench(args) -> None:
    start_compute(args)
    from icd.bench import BenchOptions, run_bench  # heavy (torch, the pipeline): --help never gets here
    from icd.train.icd import export_checkpoint  # heavy, as above

    try:
        opts = BenchOptions(task=args.task, out=args.out, n=args.n, methods=args.methods, seed_start=args.seed_start,
                            kinds=args.kinds, steps_list=args.steps_list, adapters=_adapters_arg(args.adapters),
                            model=args.model, ip2p=args.ip2p, guidance=args.guidance, tau=args.tau,
                            renoise=args.renoise,
                            batch=args.batch, n_timing=args.n_timing, examples=args.examples,
                            pie_bench=args.pie_bench, lpips=args.lpips, clip=args.clip, dino=args.dino,
                            device=args.device, ddim_rule=args.ddim_rule, compile=args.compile, force=args.force,
                            progress=not args.quiet,
                            export_checkpoint=export_checkpoint)
        results = run_bench(opts)
    except (ValueError, FileExistsError) as e:  # bad options, unknown kinds or methods, a malformed PIE-Bench folder
        raise CLIError(str(e)) from e
    if not args.quiet:
        print(f"wrote {Path(args.out) / 'results.json'} ({len(results['methods'])} methods, {results['device']})")


def add_parser(sub) -> None:
    opt = catalog.BENCH.get  # every option passed on to BenchOptions takes its default from there (a light copy)
    b = sub.add_parser("bench", help="measure methods side by side: inversion, editing, generation or guidance tables",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    b.add_argument("task", choices=catalog.BENCH_TASKS)
    b.add_argument("--out", required=True, help="folder for results.json, results.md, plots and examples")
    b.add_argument("--n", "--cases", dest="n", type=int, default=opt("n"),
                   help="cases per kind (editing, generation) or images (inversion, guidance); under torchrun write "
                   "--cases")
    b.add_argument("--methods", default=opt("methods"), help="comma-separated (default: icd,ddim50,ddim4 | "
                   "icd,ddim50,ddim4,npi50,nti50 | icd,gddim50,ddim50)")
    b.add_argument("--seed-start", type=int, default=opt("seed_start"),
                   help="first world seed (default: a held-out range)")
    b.add_argument("--kinds", default=opt("kinds"), help="editing: comma-separated edit kinds (world: "
                   f"{','.join(world.EDIT_KINDS)}; PIE-Bench: its editing types)")
    b.add_argument("--steps-list", default=opt("steps_list"), metavar="K,K,…",
                   help="step ablation for families without K")
    b.add_argument("--adapters", action="append", metavar="NAME=DIR", help="extra iCD adapters, method icd:NAME")
    b.add_argument("--model", default=opt("model"), help="model folder (default: the embedded model)")
    b.add_argument("--ip2p", default=opt("ip2p"), metavar="DIR",
                   help="InstructPix2Pix weights of the ip2pK methods (default: <model>/ip2p; `icd train ip2p`)")
    b.add_argument("--guidance", type=float, default=opt("guidance"),
                   help="code w = CFG - 1 (default 1; inversion: 0)")
    b.add_argument("--tau", type=float, default=opt("tau"),
                   help="dynamic-CFG threshold (default: the adapters' tau for icd inversion and editing; "
                   "none for generation, as in `icd generate`)")
    b.add_argument("--renoise", type=float, default=opt("renoise"), metavar="GAMMA",
                   help="generation: icd methods' re-noising strength, as `icd generate --renoise` (default "
                   f"{catalog.DEFAULT_RENOISE:g}; 0: the paper's deterministic jumps)")
    b.add_argument("--batch", type=int, default=opt("batch"),
                   help="cases per batched model call (default %(default)s)")
    b.add_argument("--n-timing", type=int, default=opt("n_timing"),
                   help="single-image runs timed per method (default %(default)s)")
    b.add_argument("--examples", type=int, default=opt("examples"),
                   help="example cases per kind in examples.png (default %(default)s)")
    b.add_argument("--pie-bench", default=opt("pie_bench"), metavar="PATH", help="PIE-Bench folder "
                   "(mapping_file.json, annotation_images/) instead of world cases")
    b.add_argument("--lpips", default=opt("lpips"), metavar="PATH",
                   help="LPIPS weights (AlexNet + v0.1 linear layers)")
    b.add_argument("--clip", default=opt("clip"), metavar="DIR", help="local CLIP model folder (CLIP-T, CLIP-I)")
    b.add_argument("--dino", default=opt("dino"), metavar="DIR", help="local DINOv2 model folder")
    b.add_argument("--device", default=opt("device"),
                   help="auto (the launcher's device, else cuda if present), cpu, cuda (default %(default)s)")
    b.add_argument("--ddim-rule", default=opt("ddim_rule"), choices=catalog.DDIM_RULES,
                   help="DDIM inversion (ddim / gddim / npi / nti): label each step's noise with its destination time "
                   "(reference, the default: the P2P / null-text reference code, diffusers' DDIMInverseScheduler) "
                   "or its start time")
    b.add_argument("--force", action="store_true", help="replace results already in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")
    add_compile(b)
    add_threads(b)
    b.set_defaults(func=cmd_bench)
