"""`icd serve`: the local web page for interactive editing (needs the `web` extra: pip install -e ".[web]")."""

from __future__ import annotations

import argparse
import ipaddress
import math
import socket
import sys

from icd.cli.common import CLIError, add_compile, add_threads, start_compute
from icd.web.uploads import DEFAULT_MAX_MB, DEFAULT_MAX_SIDE, Limits

BUILT_IN = ("embedded", "embedded-flow")  # what the page offers when no --model is given (the first: default)
MAX_UPLOAD_MB = 10_000.0  # an upload limit above 10 GB is a typo (and inf / NaN cannot become a byte count)


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise CLIError(f"--port must lie in 1..65535, got {port}")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            s.bind((host, port))
    except OSError as e:
        raise CLIError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port / --host") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def cmd_serve(args) -> None:
    try:
        import fastapi  # noqa: F401  the optional `web` extra: a clear message when it is missing
        import uvicorn  # noqa: F401  as above
    except ImportError as e:
        raise CLIError(f"icd serve needs the web extra ({e.name} is missing): pip install -e \".[web]\"") from None
    if not (math.isfinite(args.max_mb) and 0 < args.max_mb <= MAX_UPLOAD_MB) or args.max_side <= 0:
        raise CLIError(f"--max-mb must lie in (0, {MAX_UPLOAD_MB:g}] and --max-side be positive, got {args.max_mb:g} "
                       f"and {args.max_side}")
    limits = Limits(max_bytes=int(args.max_mb * 1_000_000), max_side=args.max_side)
    _check_port(args.host, args.port)
    start_compute(args)
    from icd.pipeline import Pipeline  # heavy (torch, diffusers): --help and bad options never get here
    from icd.web.app import serve  # imports fastapi: only once the extra is known to be there
    from icd.web.engine import Engine  # heavy via icd.pipeline, as above

    names = list(dict.fromkeys(args.model or BUILT_IN))  # repeated names served once, in the order given
    pipes = {}
    for name in names:
        print(f"icd serve: loading the model {name!r} …", flush=True)  # stdout: stderr holds only errors
        # the page edits on worker threads and CUDA-graph trees are per thread: `auto` compiles without CUDA graphs
        pipes[name] = Pipeline.from_pretrained(name, compile="default" if args.compile == "auto" else args.compile)
    engine = Engine(pipes)
    if not _is_loopback(args.host):
        print(f"icd serve: warning: listening on {args.host}, reachable from other machines; the page has no "
              "authentication", file=sys.stderr, flush=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"icd serve: open http://{shown}:{args.port}/ (Ctrl+C to stop)", flush=True)
    serve(engine, host=args.host, port=args.port, limits=limits)


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="a local web page for interactive editing (needs the web extra)",
                       description="Serve a web page to upload an image (or pick a world example), set the source "
                       "and target prompts and the method's controls, and see source | reconstruction | edit with "
                       "the counted UNet calls and seconds. The inversion of an unchanged image and source prompt is "
                       "cached, so a new target costs only the reverse steps. With no --model the page offers both "
                       "built-in models (the SD-shaped 'embedded', the default, and the rectified-flow "
                       "'embedded-flow'), each with the methods that run on it.",
                       epilog="examples:\n  icd serve                                  # both built-in models\n"
                       "  icd serve --port 8000 --model path/to/pipeline --max-mb 20 --max-side 4096   # one model",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    s.add_argument("--model", action="append", metavar="PATH_OR_NAME",
                   help="'embedded', 'embedded-flow' or a diffusers pipeline folder; repeat to offer several (the "
                   "first is the page's default; default: both built-in models)")
    s.add_argument("--max-mb", type=float, default=DEFAULT_MAX_MB, help="upload size limit in MB (default %(default)s)")
    s.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help="largest image side in pixels (default %(default)s)")
    add_compile(s)
    add_threads(s)
    s.set_defaults(func=cmd_serve)
