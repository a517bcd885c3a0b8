"""The `icd` command line. Run `icd <command> --help` for each command's options and examples.

One module per command group: each defines `add_parser(subparsers)` and its `cmd_*` function(s); `main` parses,
runs the command and turns the user-error classes (`common.user_errors`) into one line, exit 2. No command module
imports torch or diffusers at module level: a command imports them when it starts computing (`common.start_compute`,
which applies --threads), so --help, a usage error and `icd world …` answer in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import sys

from icd.cli import batch, bench, demo, sample, serve, train, world
from icd.cli.common import CLIError, print_error, restore_threads, user_errors

__all__ = ["CLIError", "build_parser", "main"]

EXAMPLES = """examples:
  icd world case --kind color --seed 1 --out out/case1
  icd world grid --n 16 -o out/grid.png
  icd generate "a large red circle on a gray background" --seed 0 --guidance 1 -o out/gen.png
  icd generate "a large red circle on a gray background" --method ddim --steps 50 --guidance 1 -o out/gen50.png
  icd invert out/case1/source.png --prompt "a large purple triangle on a gray background" \\
      -o out/recon.png --json
  icd invert out/case1/source.png --prompt "a large purple triangle on a gray background" \\
      --method ddim --steps 50 -o out/recon50.png
  icd edit out/case1/source.png --source "a large purple triangle on a gray background" \\
      --target "a large blue triangle on a gray background" --blend purple blue -o out/edit.png --json
  icd train teacher --config configs/embedded.toml
  icd train icd --config configs/icd-ablation.toml --section G3
  icd bench editing --n 20 --methods icd,ddim50 --out out/bench/edit20
  icd bench inversion --n 200 --methods icd,ddim --steps-list 1,2,3,4,50 --out out/bench/inv
  torchrun --standalone --nproc_per_node 2 -m icd.cli bench generation --cases 100 --out out/bench/gen
  icd serve --port 7860          # the local web page (pip install -e ".[web]")
(out/case1's captions are those of `icd world case --kind color --seed 1`: see out/case1/case.json)
"""

# The command groups in --help order; `sample` adds generate and invert, `batch` adds edit (`edit`'s parser and
# single edit, with --batch run by `batch`).
COMMANDS = (world, train, sample, batch, bench, demo, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="icd", description="Invertible consistency distillation: fast text-guided "
                                "image editing with latent diffusion models.", epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args)  # None: done; an int: its exit code (1: `icd edit --batch` with failed lines)
    except KeyboardInterrupt:
        print("icd: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, user_errors()):
            print_error(e)
            return 2
        if args.verbose:  # a bug, not the user's mistake: one line, and the traceback on request
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"icd: internal error: {type(e).__name__}: {msg} (re-run with -v for the traceback)", file=sys.stderr)
        return 1
    finally:  # an in-process caller (the tests, a notebook) keeps its own thread count
        restore_threads()
    return code or 0
