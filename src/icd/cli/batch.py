"""`icd edit --batch EDITS.jsonl`: many edits in one process with one model load and a progress bar.

One JSON object per line: ``image``, ``source``, ``target``, ``output`` and optional ``controls`` (the per-edit
options of `icd edit` by name: ``{"blend": ["red", "blue"], "seed": 3, "cross_replace": 0.4}``); relative paths are
taken from the file's folder; every other option of the command line (--method, --model, --steps, --guidance, …)
applies to every line, and a line's controls override it. Policy:

1. before the model loads, every line is parsed and checked as a single `icd edit` is (its image readable, its
   output writable and new unless --force, its options in range); outputs must differ from each other and from every
   line's image. A bad line stops the batch there: one line naming the file and line number, exit 2, nothing written;
2. with the model loaded, before any edit, each line's prompts, controls and settings are checked against it (words
   the model cannot read, blend words in neither prompt, guidance out of range): as 1;
3. an edit that fails while running (NaN / Inf latents, a user error found only then) is reported with its line
   number and the batch goes on; the command exits 1 at the end naming the count and the lines. A bug stops the
   batch as in a single edit (`icd: internal error`, exit 1): the outputs written so far stay.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from icd.cli import edit
from icd.cli.common import CLIError, library_errors, user_errors
from icd.imageio import load_image
from icd.io import file_problem

FIELDS = ("image", "source", "target", "output", "controls")
REQUIRED = ("image", "source", "target", "output")
CONTROLS = ("guidance", "tau", "seed", "strength", "cross_replace", "self_replace", "p2p_blocks", "blend",
            "blend_threshold", "reweight", "mask", "masactrl", "masactrl_start_t", "masactrl_layer", "swap",
            "instruction", "image_guidance", "fit")  # per-edit options of `icd edit` (their argparse dest)
MAX_LINES = 100_000
MAX_BYTES = 64 * 2**20  # a 64 MB edit list is a mistake (100 000 lines of ~300 bytes are 30 MB)


class _LineParser(argparse.ArgumentParser):
    """`icd edit`'s options, parsing one line's controls: a bad value is a CLIError (the caller adds the line)."""

    def error(self, message):
        raise CLIError(message)


def _tokens(parser: _LineParser, controls: dict) -> tuple[list[str], dict]:
    """`controls` as `icd edit` arguments, and the flags set to False (a line may switch off the command's)."""
    actions = {a.dest: a for a in parser._actions}
    tokens, off = [], {}
    for key, value in controls.items():
        if key not in CONTROLS:
            raise CLIError(f"controls: unknown key {key!r} (per-edit options: {', '.join(CONTROLS)}; the others "
                           "apply to the whole batch on the command line)")
        action, flag = actions[key], actions[key].option_strings[-1]
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise CLIError(f"controls: {key} must be true or false, got {value!r}")
            tokens += [flag] if value else []
            off |= {} if value else {key: False}
        elif isinstance(value, (dict, list)) and key in ("blend", "reweight"):
            items = [f"{w}={f}" for w, f in value.items()] if isinstance(value, dict) else value
            if not items or not all(isinstance(i, str) for i in items):
                raise CLIError(f"controls: {key} must be a non-empty list of words, got {value!r}")
            tokens += [flag, *items] if key == "blend" else [f"{flag}={i}" for i in items]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            tokens += [flag, *str(value).split()] if key == "blend" else [f"{flag}={value}"]
        else:
            raise CLIError(f"controls: {key} takes a number or a text, got {value!r}")
    return tokens, off


def _line_args(args, parser: _LineParser, obj, base: Path) -> argparse.Namespace:
    """The namespace of one line: the command line's options, the line's fields and controls."""
    if not isinstance(obj, dict):
        raise CLIError(f"expected a JSON object with {', '.join(REQUIRED)}, got {type(obj).__name__}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise CLIError(f"unknown field(s) {', '.join(map(repr, unknown))}; a line holds {', '.join(FIELDS)}")
    missing = [k for k in REQUIRED if not isinstance(obj.get(k), str) or not obj[k].strip()]
    if missing:
        raise CLIError(f"{', '.join(missing)} missing or not a non-empty text")
    controls = obj.get("controls") or {}
    if not isinstance(controls, dict):
        raise CLIError(f"controls must be a JSON object, got {type(controls).__name__}")
    tokens, off = _tokens(parser, controls)
    ns = parser.parse_args(tokens, namespace=argparse.Namespace(**vars(args)))
    for key in ("image", "output"):
        setattr(ns, key, str(base / obj[key]))  # an absolute path stays itself
    if controls.get("mask"):
        ns.mask = str(base / controls["mask"])
    ns.source, ns.target = obj["source"], obj["target"]
    vars(ns).update(off)
    return ns


def read_edits(args) -> list[tuple[int, argparse.Namespace]]:
    """(line number, namespace) of every edit of args.batch, each checked as a single edit is before the model
    loads (policy 1 of the module docstring); CLIError naming the file and line."""
    path = Path(args.batch)
    problem = file_problem(path)
    if problem:
        raise CLIError(f"--batch {path}: {problem}")
    if path.stat().st_size > MAX_BYTES:
        raise CLIError(f"--batch {path}: larger than {MAX_BYTES // 2**20} MB")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--batch {path}: cannot read it as UTF-8 text ({e})") from None
    parser = _LineParser(prog="icd edit --batch", add_help=False)
    edit.add_arguments(parser)
    edits, outputs = [], {}
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        with _at(path, number):
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CLIError(f"not JSON ({e.msg} at column {e.colno})") from None
            ns = _line_args(args, parser, obj, path.parent)
            edit._check_args(ns)
            load_image(ns.image)  # readable, decodable, within the pixel limit
            out = Path(ns.output).resolve()
            if out in outputs:
                raise CLIError(f"output {ns.output} is also line {outputs[out]}'s output")
            outputs[out] = number
        edits.append((number, ns))
        if len(edits) > MAX_LINES:
            raise CLIError(f"--batch {path}: more than {MAX_LINES} edits")
    if not edits:
        raise CLIError(f"--batch {path}: no edits (one JSON object per line)")
    for number, ns in edits:
        with _at(path, number):
            if Path(ns.image).resolve() in outputs:
                raise CLIError(f"image {ns.image} is line {outputs[Path(ns.image).resolve()]}'s output")
            edit._check_controls(ns)
    return edits


class _at:
    """Context: a user error of one line re-raised as a CLIError that names `path` and the line `number`."""

    def __init__(self, path: Path, number: int):
        self.where = f"{path} line {number}"

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is not None and isinstance(e, user_errors()):
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CLIError(f"{self.where}: {msg}") from None
        return False


def add_parser(sub) -> None:
    """`icd edit` (`edit.add_parser`, which declares --batch) run by `cmd_edit`: one edit or a batch."""
    edit.add_parser(sub)
    sub.choices["edit"].set_defaults(func=cmd_edit)


def cmd_edit(args) -> int | None:
    return edit.cmd_edit(args) if args.batch is None else cmd_edit_batch(args)


def cmd_edit_batch(args) -> int:
    given = [edit._flag(d) for d in edit._PER_EDIT + edit._SINGLE_ONLY if getattr(args, d) is not None]
    if given:
        raise CLIError(f"--batch takes each edit's image, prompts and output from its lines: drop {', '.join(given)}")
    t0 = time.perf_counter()
    edits = read_edits(args)
    editor = edit.load_editor(args)
    model = editor.model_for(args.method)
    for number, ns in edits:  # policy 2: what only the model can check, before any edit
        with _at(Path(args.batch), number), library_errors():
            model.check_prompts([ns.source, ns.target])
            editor.settings(args.method, "edit", guidance=ns.guidance, tau=ns.tau, steps=args.steps,
                            strength=ns.strength)
            edit._controls(ns, None, args.method, notice=False)
    t1 = time.perf_counter()
    from tqdm.auto import tqdm  # with the pipeline (its dependency)

    reports, failed = [], []
    for number, ns in tqdm(edits, desc="icd edit --batch", unit="edit", disable=not sys.stderr.isatty()):
        try:
            with _at(Path(args.batch), number):
                report = {"line": number} | edit.edit_one(editor, ns, load_image(ns.image))
        except CLIError as e:  # policy 3: report, go on
            failed.append({"line": number, "error": str(e)})
            tqdm.write(f"icd: error: {e}", file=sys.stderr)
            continue
        reports.append(report)
        if not args.json:
            tqdm.write(f"line {number}: wrote {ns.output}: {report['method']} {report['control']}, "
                       f"{report['nfe']} UNet calls, {report['seconds']:.2f} s", file=sys.stdout)
    t2 = time.perf_counter()
    summary = {"edits": len(edits), "done": len(reports), "failed": failed, "seconds_load": round(t1 - t0, 4),
               "seconds_edits": round(sum(r["seconds"] for r in reports), 4), "seconds": round(t2 - t0, 4),
               "results": reports}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{len(reports)} of {len(edits)} edits written: load {t1 - t0:.2f} s, edits "
              f"{summary['seconds_edits']:.2f} s, all {t2 - t0:.2f} s")
    if failed:
        lines = ", ".join(str(f["line"]) for f in failed)
        print(f"icd: error: {len(failed)} of {len(edits)} edits failed (line{'s' * (len(failed) > 1)} {lines})",
              file=sys.stderr)
        return 1
    return 0

