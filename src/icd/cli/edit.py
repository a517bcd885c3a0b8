"""`icd edit`: invert an image with the source prompt, then decode it under the target prompt."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from icd.cli import catalog, remote
from icd.cli.common import (
    CLIError,
    add_model_options,
    fit_to_model,
    library_errors,
    load_pipeline,
    numerics_named,
    seed,
)
from icd.imageio import FITS, check_output, fit_image, load_image, save_image
from icd.io import folder_problem, output_problem, pair_paths, shown
from icd.methods import REGISTRY  # light: the menus; a method's object (and torch) on REGISTRY.get
from icd.plotting import captioned_grid

if TYPE_CHECKING:  # the heavy modules (torch, diffusers) are imported where an edit starts computing
    from icd.editing.inversion import Inversion
    from icd.pipeline import Pipeline

P2P, MASACTRL, DEFAULT_STRENGTH = catalog.P2P, catalog.MASACTRL, catalog.DEFAULT_STRENGTH


def _reweight(args) -> dict[str, float]:
    """--reweight WORD=F ... (`icd.requests.parse_reweight`)."""
    from icd.requests import parse_reweight  # heavy (the controls' module): after the light checks

    try:
        return parse_reweight(args.reweight, name="--reweight")
    except ValueError as e:
        raise CLIError(str(e)) from None


def _blocks(args):
    """--p2p-blocks (`icd.requests.parse_blocks`)."""
    from icd.requests import parse_blocks  # heavy (the controls' module): after the light checks

    try:
        return parse_blocks(args.p2p_blocks, name="--p2p-blocks")
    except ValueError as e:
        raise CLIError(str(e)) from None


_PER_EDIT = ("image", "source", "target", "output")  # what one edit names; --batch's lines name them instead
_SINGLE_ONLY = ("grid", "save_inversion", "inversion", "server")  # options of a single edit (refused with --batch)


def _flag(dest: str) -> str:
    return {"image": "IMAGE", "output": "-o/--output"}.get(dest, "--" + dest.replace("_", "-"))


def _check_single(args) -> None:
    """A single edit names its image, prompts and output (in argparse's words; exit code 2)."""
    missing = [_flag(d) for d in _PER_EDIT if getattr(args, d) is None]
    if missing:
        raise CLIError(f"the following arguments are required: {', '.join(missing)} (or --batch EDITS.jsonl)")


def _check_args(args) -> None:
    outputs = [args.output] + ([args.grid] if args.grid else [])
    for path in outputs:
        check_output(path, force=args.force, inputs=(args.image,))
    if args.grid and Path(args.grid).resolve() == Path(args.output).resolve():
        raise CLIError("-o and --grid name the same file")
    if args.save_inversion:
        _check_save_inversion(args)
    if not args.source.strip() or not args.target.strip():
        raise CLIError("the source or target prompt is empty")
    if args.masactrl and args.swap:
        raise CLIError("--masactrl and --swap are exclusive")
    _check_method_options(args)


def _check_controls(args) -> None:
    """The controls' ranges (P2PControls / MasaCtrlControls) before the model loads. Their checks live in the
    controls' dataclasses, whose module imports torch and diffusers: these come after every light check."""
    from icd.editing.controllers import MasaCtrlControls, P2PControls  # heavy, as above

    with library_errors():
        P2PControls(cross_replace=args.cross_replace, self_replace=args.self_replace,
                    reweight=_reweight(args), blend_threshold=args.blend_threshold, blocks=_blocks(args))
        if args.masactrl:
            MasaCtrlControls(start_t=args.masactrl_start_t, start_layer=args.masactrl_layer)


def _check_save_inversion(args) -> None:
    """--save-inversion's two files (`pair_paths`): writable, regular files or new, not the --inversion read."""
    if not args.save_inversion.strip():
        raise CLIError("--save-inversion is empty")
    saved = pair_paths(args.save_inversion)
    for path in saved:
        problem = output_problem(path)  # too long, a directory, a device node: refused even with --force
        if problem:
            raise CLIError(f"--save-inversion {shown(path)}: {problem}")
    problem = folder_problem(saved[0].parent)
    if problem:
        raise CLIError(f"--save-inversion {args.save_inversion}: {problem}")
    if any(os.path.lexists(p) for p in saved) and not args.force:
        raise CLIError(f"{saved[0]} already exists (use --force to overwrite the saved inversion)")
    if args.inversion and any(p.resolve() == q.resolve() for p in saved for q in pair_paths(args.inversion)):
        raise CLIError("--save-inversion would overwrite the --inversion it reads")


# attention-control options (dest, default) a method without attention control (SDEdit, IP2P) refuses
_CONTROL_OPTIONS = (("masactrl", False), ("swap", False), ("blend", None), ("mask", None), ("reweight", None),
                    ("cross_replace", P2P["cross_replace"]), ("self_replace", P2P["self_replace"]),
                    ("blend_threshold", P2P["blend_threshold"]), ("masactrl_start_t", MASACTRL["start_t"]),
                    ("masactrl_layer", MASACTRL["start_layer"]), ("ddim_rule", catalog.DEFAULT_DDIM_RULE),
                    ("p2p_blocks", None))
_OWN_OPTIONS = ("instruction", "image_guidance")  # options of one method (`Method.options`: IP2P's)


def _check_method_options(args) -> None:
    """The per-method options, read from the registry: --strength only for a method that takes one (and in
    (0, 1]); a method's own options (--instruction, --image-guidance) and weights (--ip2p) only for it; a method
    without attention control refuses those options, one without a dynamic-CFG threshold --tau."""
    method = REGISTRY.lookup(args.method, "edit")
    if args.strength is not None:
        if args.inversion:
            raise CLIError("--strength applies when noising the image; a saved --inversion keeps its own strength")
        if not method.takes_strength:
            raise CLIError(f"--strength applies to --method {' / '.join(REGISTRY.names('edit', strength=True))}, "
                           f"not {args.method}")
        try:
            catalog.check_strength(args.strength)
        except ValueError as e:
            raise CLIError(str(e)) from None
    if args.inversion:
        return  # the saved inversion's method is known once it is read (`_controls` checks it then)
    given = [o for o in _OWN_OPTIONS if getattr(args, o) is not None and o not in method.options]
    owners = [n for o in given for n in REGISTRY.names("edit", option=o)]
    if args.ip2p is not None and method.weights != "ip2p":
        given.append("ip2p")
        owners += [m.name for m in REGISTRY.menu("edit") if m.weights == "ip2p"]
    if given:
        raise CLIError(f"{' and '.join('--' + o.replace('_', '-') for o in given)} apply to --method "
                       f"{' / '.join(dict.fromkeys(owners))}, not {args.method}")
    _refuse_for(args, method)


def _refuse_for(args, method) -> None:
    """What `method` cannot take: attention-control options, --tau, an empty --instruction."""
    if not method.attention_control:
        given = [dest for dest, value in _CONTROL_OPTIONS if getattr(args, dest) != value]
        if given:
            raise CLIError(f"--method {method.name} takes no attention control: drop "
                           f"{', '.join('--' + d.replace('_', '-') for d in given)}")
    if not method.takes_tau and args.tau is not None:
        raise CLIError(f"--method {method.name} takes no --tau (its guidance is constant)")
    if "instruction" in method.options and args.instruction is not None and not args.instruction.strip():
        raise CLIError("--instruction is empty")


def _user_mask(args, size: tuple[int, int], fit: str):
    """--mask as a boolean [H, W] array at the fitted image's size (W, H), fitted as the image is, or None."""
    if not args.mask:
        return None
    mask_im = load_image(args.mask)
    fitted = mask_im.resize(size) if fit == "aspect" else fit_image(mask_im, size[0], fit)
    mask = np.asarray(fitted.convert("L")) > 127
    if not mask.any():
        raise CLIError(f"the mask {args.mask} selects no pixels")
    return mask


def _controls(args, mask, name: str, *, notice: bool = True):
    """The method's controls (`icd.requests.edit_controls`): Prompt-to-Prompt (default), MasaCtrl (--masactrl) or
    a plain prompt swap (--swap) where it takes attention control, with its own options (IP2P: the instruction and
    s_I; --guidance is its text code w, s_T = w + 1)."""
    from icd.requests import AttentionRequest, edit_controls, refine_notice  # heavy, as above

    method = REGISTRY.get(name, "edit")
    _refuse_for(args, method)  # a saved --inversion: its method is known only now
    attention = AttentionRequest(cross_replace=args.cross_replace, self_replace=args.self_replace,
                                 reweight=_reweight(args), blend=tuple(args.blend or ()),
                                 blend_threshold=args.blend_threshold, p2p_blocks=_blocks(args),
                                 mask=None if mask is None else mask.astype(np.float32), masactrl=args.masactrl,
                                 masactrl_start_t=args.masactrl_start_t, masactrl_layer=args.masactrl_layer,
                                 swap=args.swap)
    controls = edit_controls(method, source=args.source, target=args.target, guidance=args.guidance, tau=args.tau,
                             attention=attention, **{o: getattr(args, o) for o in method.options})
    refine = refine_notice(args.source, args.target, controls) if notice else None
    if refine:
        print(f"notice: {refine}", file=sys.stderr)
    return controls


def _saved_inversion(args) -> Inversion | None:
    """The saved inversion of --inversion (made with the same source prompt), or None."""
    if not args.inversion:
        return None
    from icd.editing.inversion import Inversion  # heavy: the model is loaded already

    inversion = Inversion.load(args.inversion)
    if inversion.prompts != [args.source]:
        raise CLIError(f"the saved inversion was made with the prompt {inversion.prompts[0]!r}, not --source")
    return inversion


def _inversion(editor: Pipeline, args, image: np.ndarray, saved: Inversion | None) -> Inversion:
    """The saved inversion, else a fresh one of `image` (SDEdit: the noised latent, no UNet call)."""
    if saved is not None:
        return saved
    return editor.invert(image, [args.source], method=args.method, steps=args.steps, seed=args.seed,
                         guidance=args.guidance, ddim_rule=args.ddim_rule, strength=args.strength,
                         progress=sys.stderr.isatty())  # NTI's per-step optimisation bar


def cmd_edit(args) -> None:
    """One edit (`icd edit --batch`: `icd.cli.batch`, which dispatches here without --batch)."""
    _check_single(args)
    _check_args(args)
    image = load_image(args.image)  # a bad file: one line here, before any model or server
    if args.server:
        report = _edit_on_server(args)
    else:
        _check_controls(args)
        editor = load_editor(args)
        report = edit_one(editor, args, image)
    print(json.dumps(report) if args.json else
          f"wrote {args.output}: {report['method']} {report['control']}, {report['nfe']} UNet calls "
          f"({report['nfe_invert']} invert + {report['nfe_edit']} edit), {report['seconds']:.2f} s")


def _edit_on_server(args) -> dict:
    """The edit of `args` (checked) run by the `icd serve` at --server; writes -o (and --grid) from its answer and
    returns its report. No torch here: this path waits for the server's edit only."""
    remote.check_url(args.server)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    refused = remote.unsupported(args, defaults)
    if refused:
        raise CLIError(f"--server runs what the web page offers: drop {', '.join(refused)} (or edit here, without "
                       "--server)")
    answer = remote.post_edit(args.server, remote.form_fields(args, defaults["model"]), Path(args.image))
    images = {name: np.asarray(Image.open(io.BytesIO(remote.png_bytes(answer[name]))).convert("RGB"))
              for name in ("source", "reconstruction", "edit")}
    save_image(images["edit"], args.output)
    if args.grid:
        grid = captioned_grid([images["source"], images["reconstruction"], images["edit"]],
                              [f"source: {args.source}", f"reconstruction ({answer['method']})",
                               f"edit: {args.target}"], cols=3, scale=4, text_lines=4)
        save_image(grid, args.grid)
    report = {k: v for k, v in answer.items() if k not in images and k != "notice"}
    if answer.get("notice"):
        print(f"notice: {answer['notice']}", file=sys.stderr)
    return report | {"output": str(args.output), "server": args.server}


def load_editor(args) -> Pipeline:
    """The pipeline of the model options with what --method needs beyond it loaded (IP2P's weights)."""
    editor = load_pipeline(args, ip2p=args.ip2p)
    with library_errors():  # e.g. IP2P's missing or incomplete weights folder: one line naming `icd train ip2p`
        REGISTRY.get(args.method).prepare(editor)
    return editor


def edit_one(editor: Pipeline, args, image) -> dict:
    """One checked edit (`_check_args`, `_check_controls`) of `image` (PIL) on the loaded `editor`: fitted, inverted,
    edited, written to args.output (and --grid, --save-inversion); returns its report (what --json prints)."""
    from icd.requests import run_edit  # loaded with the pipeline

    model = editor.model
    fitted = fit_to_model(image, model, args.fit)
    image = np.asarray(fitted)[None]
    with library_errors():  # out-of-range controls, a --steps the adapters cannot take
        mask = _user_mask(args, fitted.size, args.fit or model.default_fit)
        saved = _saved_inversion(args)
        controls = _controls(args, mask, args.method if saved is None else saved.method)
        with numerics_named(model):
            run = run_edit(editor, lambda: (_inversion(editor, args, image, saved), saved is not None), [args.target],
                           controls)
    result, inversion = run.result, run.inversion
    if args.save_inversion:
        inversion.save(pair_paths(args.save_inversion)[0])
    save_image(result.images[0], args.output)
    if args.grid:
        grid = captioned_grid([image[0], result.reconstructions[0], result.images[0]],
                              [f"source: {args.source}", f"reconstruction ({inversion.method})",
                               f"edit: {args.target}"], cols=3, scale=4, text_lines=4)
        save_image(grid, args.grid)
    st = result.settings
    report = run.report() | {"guidance": st.guidance, "output": str(args.output)}
    if args.save_inversion:
        report["inversion"] = str(pair_paths(args.save_inversion)[0])
    if st.strength is not None:
        report["strength"] = st.strength
    report |= {k: v for k, v in st.extra.items() if k != "control"} | {"steps": st.steps}  # e.g. IP2P's scales
    return report


_DEFAULT_METHOD = "icd"


def add_parser(sub) -> None:
    e = sub.add_parser("edit", help="invert an image and regenerate it under a target prompt",
                       description="Invert IMAGE with the source prompt, then decode [source, target] in one batch "
                       "with Prompt-to-Prompt (default), MasaCtrl (--masactrl) or a plain prompt swap (--swap).")
    add_arguments(e)
    e.set_defaults(func=cmd_edit)


def add_arguments(e) -> None:
    """Every option of `icd edit` (also the parser of one --batch line's controls)."""
    e.add_argument("image", nargs="?", help="the image to edit (none with --batch)")
    e.add_argument("--source", help="caption of the image")
    e.add_argument("--target", help="the edited caption")
    e.add_argument("--batch", default=None, metavar="EDITS.jsonl",
                   help="many edits in one process with one model load: one JSON object per line with image, source, "
                   "target, output and optional controls ({\"blend\": [\"red\", \"blue\"], \"seed\": 3, ...}: "
                   "the per-edit options by name); paths relative to the file's folder; the other options apply to "
                   "every line (README: icd edit --batch)")
    e.add_argument("--method", default=_DEFAULT_METHOD, choices=REGISTRY.names("edit"),
                   help="; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.menu("edit")) +
                   " (sdedit / sdedit-icd: no inversion, no attention control; ip2p: --ip2p DIR, `icd train ip2p`)")
    e.add_argument("--steps", type=int, default=None, help="icd, sdedit-icd: the adapters' segment count; ip2p: 100; "
                   "others: 50 (sdedit runs the steps below its start)")
    e.add_argument("--strength", type=float, default=None,
                   help=f"sdedit / sdedit-icd: noise level S in (0, 1] where the edit starts, t = S T "
                   f"(default {DEFAULT_STRENGTH:g})")
    e.add_argument("--instruction", default=None, metavar="TEXT",
                   help="ip2p: the edit in words (default: derived from --source and --target, e.g. 'make the circle "
                   "blue')")
    e.add_argument("--image-guidance", type=float, default=None, metavar="S_I",
                   help="ip2p: image guidance scale s_I (1: unguided; default: the weights' validated choice)")
    e.add_argument("--ip2p", default=None, metavar="DIR",
                   help="ip2p: the InstructPix2Pix weights folder (default: <model>/ip2p; `icd train ip2p`)")
    e.add_argument("--seed", type=seed, default=0, help="icd: seed of the encoding noise; sdedit: of its noise draw")
    e.add_argument("--guidance", type=float, default=catalog.EDIT["guidance"],
                   help=f"target guidance code w = CFG - 1 (default {catalog.DEFAULT_GUIDANCE['edit']:g} on the "
                   "embedded model; SD 1.5: 19, SDXL: 7 for icd, 6.5 for the baselines)")
    e.add_argument("--tau", type=float, default=catalog.EDIT["tau"],
                   help="dynamic CFG threshold (icd default: the adapters' tau)")
    e.add_argument("--cross-replace", type=float, default=P2P["cross_replace"],
                   help="P2P cross-attention window (fraction, default %(default)s)")
    e.add_argument("--self-replace", type=float, default=P2P["self_replace"],
                   help="P2P self-attention window (fraction, default %(default)s)")
    e.add_argument("--p2p-blocks", default=None, metavar="BLOCKS",
                   help="flow transformers: the joint-attention blocks P2P controls: all, double (double-stream), "
                   "single (single-stream) or indices such as 0,2,5 (double-stream first; default: all, docs/flow.md "
                   "§6)")
    e.add_argument("--blend", nargs="+", metavar="WORD", help="local blend words (from either prompt)")
    e.add_argument("--blend-threshold", type=float, default=P2P["blend_threshold"],
                   help="local blend threshold (default %(default)s)")
    e.add_argument("--reweight", action="append", metavar="WORD=F", help="scale a target word's attention")
    e.add_argument("--mask", default=None, help="user mask image (white = may change) instead of blend words")
    e.add_argument("--masactrl", action="store_true", help="MasaCtrl mutual self-attention (non-rigid edits)")
    e.add_argument("--masactrl-start-t", type=int, default=MASACTRL["start_t"],
                   help="MasaCtrl acts at t <= this (default %(default)s)")
    e.add_argument("--masactrl-layer", type=int, default=MASACTRL["start_layer"],
                   help="first controlled block (default: decoder)")
    e.add_argument("--swap", action="store_true", help="plain prompt swap without attention control")
    e.add_argument("--fit", default=None, choices=FITS,
                   help="policy for photos of other sizes (default: resize to the embedded model's square; "
                   "aspect for Stable Diffusion)")
    e.add_argument("--save-inversion", default=None, metavar="PATH",
                   help="save the inversion for reuse as two files, PATH.json and PATH.safetensors: the name is kept "
                   "whole, dots included (run.v1 -> run.v1.json + run.v1.safetensors); only a trailing .json or "
                   ".safetensors is dropped first")
    e.add_argument("--inversion", default=None, metavar="PATH",
                   help="reuse a saved inversion (4 NFE per edit): PATH as given to --save-inversion, or either of "
                   "its two files")
    e.add_argument("--grid", default=None, help="also write source | reconstruction | edit")
    e.add_argument("--server", default=None, metavar="URL",
                   help="run the edit in a running `icd serve` at URL (e.g. http://127.0.0.1:7860), whose model is "
                   "loaded already: the command waits for the edit alone; the page's options only (method, steps, "
                   "seed, guidance, tau, P2P windows, blend, reweight, masactrl, fit; --model names a served model)")
    e.add_argument("-o", "--output", help="the edited image (PNG)")
    add_model_options(e)
