"""What every command module shares: CLIError, the user-error classes and their one-line report, argument helpers.

Nothing here imports torch or diffusers at module level: `icd --help`, a one-line error and `icd world …` must
answer without them (tests/test_startup.py). `start_compute` is where a command begins heavy work.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import sys

import numpy as np

from icd.cli import catalog
from icd.imageio import ImageError, fit_image, looks_like_shapes_world
from icd.world import CaptionError


class CLIError(Exception):
    """An ordinary user mistake: reported in one line, exit code 2."""


# Raised by the library for bad inputs (not bugs): `main` reports them in one line and exits with code 2. Most live in
# modules that import torch; an exception can only come from a module already imported, so `user_errors` reads
# these from `sys.modules` alone and a command that never loaded torch never imports it to report its error.
_USER_ERROR_CLASSES = (("icd.models.base", "PromptError"), ("icd.models.loading", "ModelError"),
                       ("icd.train.config", "ConfigError"), ("icd.editing.tokens", "AlignmentError"),
                       ("icd.solver", "NumericsError"), ("icd.train.checkpoint", "CheckpointError"),
                       ("icd.editing.inversion", "InversionError"))
_LIGHT_USER_ERRORS = (CLIError, ImageError, CaptionError, FileNotFoundError)


def user_errors() -> tuple[type[BaseException], ...]:
    """The user-error classes of the modules imported so far (all of `USER_ERRORS` that can have been raised)."""
    loaded = tuple(getattr(sys.modules[m], name) for m, name in _USER_ERROR_CLASSES if m in sys.modules)
    return _LIGHT_USER_ERRORS + loaded


def __getattr__(name: str):
    if name == "USER_ERRORS":  # every user-error class (imports their modules: torch)
        return _LIGHT_USER_ERRORS + tuple(getattr(importlib.import_module(m), n) for m, n in _USER_ERROR_CLASSES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_threads_before: list[int] = []  # the caller's torch thread count, restored by `main` (`restore_threads`)


def start_compute(args) -> None:
    """Where a command starts heavy work (torch, a model): --threads applied (the one place it takes effect, once
    per `main`) and, unless -v, transformers / diffusers kept to errors. Commands call it before their first heavy
    import; their argument checks come first and stay light."""
    import torch  # heavy: the point of this function

    if hasattr(args, "threads") and not _threads_before:
        from icd.runtime import default_threads  # imports torch, as above

        _threads_before.append(torch.get_num_threads())
        torch.set_num_threads(args.threads if args.threads > 0 else default_threads())
    if not getattr(args, "verbose", False):
        quiet_libraries()


def restore_threads() -> None:
    """The caller's torch thread count back after `main` (an in-process caller keeps its own)."""
    if _threads_before:
        import torch  # imported already: start_compute ran

        torch.set_num_threads(_threads_before.pop())


def print_error(e: BaseException) -> None:
    """`icd: error: <the message's first line>` on stderr."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"icd: error: {msg}", file=sys.stderr)


def default(cls, name: str):
    """The default of dataclass `cls`'s field `name`, so options follow the library's defaults."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


@contextlib.contextmanager
def library_errors():
    """Report the library's range checks (ValueError) for the user's options as one-line CLI errors."""
    try:
        yield
    except ValueError as e:
        raise CLIError(str(e)) from e


@contextlib.contextmanager
def numerics_named(model):
    """A NaN / Inf in the latents (`NumericsError`, raised by the sampling loop after the options passed their range
    checks) re-raised with its cause: weights that hold NaN / Inf (named), else fp16's range overflowed."""
    from icd.solver import NumericsError  # heavy: a model is loaded already

    try:
        yield
    except NumericsError as e:
        raise NumericsError(f"{e}: {_numerics_cause(model)}") from None


def _numerics_cause(model) -> str:
    import torch  # heavy: only once a model is loaded

    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(model, part, None)
        bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()] if module is not None else []
        if bad:
            return (f"the {part}'s weights hold NaN/Inf ({len(bad)} tensor{'s' * (len(bad) > 1)}, e.g. {bad[0]}): "
                    "check the --model / --unet / --adapters / --lora-* files")
    if model.dtype == torch.float16:
        return "fp16 activations overflowed (beyond 65504): re-run with --dtype fp32 (or bf16)"
    return (f"the weights are finite and every option lies in its checked range; the {model.dtype} activations "
            "overflowed (re-run with -v for the traceback)")


MAX_THREADS = 1024
OFFLOAD_MODES = ("none", "model", "sequential")  # icd.models.memory.OFFLOAD_MODES, copied light (tests/test_memory.py)
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed takes


def _integer_in(text: str, low: int, high: int, shown: str) -> int:
    """An argparse type: the integer `text` within [low, high] (`shown` names the range in the message)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must lie in {shown}, got {value}")
    return value


def _threads(text: str) -> int:
    """--threads: 0 (torch's default) to MAX_THREADS; a huge count would crash the OpenMP runtime (found by fuzzing)."""
    return _integer_in(text, 0, MAX_THREADS, f"0..{MAX_THREADS}")


def seed(text: str) -> int:
    """--seed: an integer in 0..2^64-1."""
    return _integer_in(text, 0, MAX_SEED, "0..2^64-1")


def add_threads(parser: argparse.ArgumentParser) -> None:
    """--threads, the one declaration; `main` applies it before running the command."""
    parser.add_argument("--threads", type=_threads, default=0,
                        help="torch CPU threads (0: one per idle core, from the load average)")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The model options of generate, invert and edit (`load_pipeline` reads them), --threads, --json, --force."""
    m = parser.add_argument_group("model (docs/stable-diffusion.md)")
    m.add_argument("--model", default="embedded", metavar="PATH_OR_HUB_ID",
                   help="'embedded', 'embedded-flow' (the FLUX-shaped flow model), a diffusers SD 1.5 / SDXL / FLUX "
                        "pipeline folder, or a hub id")
    m.add_argument("--unet", default=None, metavar="PATH_OR_HUB_ID",
                   help="guidance-distilled UNet: a diffusers UNet folder, hub id, or state-dict file "
                   "(default: <model>/unet_guidance)")
    m.add_argument("--adapters", default=None, metavar="DIR", help="our iCD adapters folder (default: <model>/icd)")
    m.add_argument("--lora-forward", default=None, metavar="FILE", help="the released forward LoRA file")
    m.add_argument("--lora-reverse", default=None, metavar="FILE", help="the released reverse LoRA file")
    m.add_argument("--boundaries", default=None, metavar="SET",
                   help="4step-1 / 4step-2 / 3step or E_R such as 0,259,519,779 (default: the adapters')")
    m.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    m.add_argument("--ddim-rule", default=catalog.DEFAULT_DDIM_RULE, choices=catalog.DDIM_RULES,
                   help="DDIM inversion (ddim / npi / nti): label each step's noise with its destination time "
                   "(reference, the default: the P2P / null-text reference code, diffusers' DDIMInverseScheduler) "
                   "or its start time")
    m.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="weights' precision (auto: fp16 on CUDA, fp32 on a CPU)")
    m.add_argument("--offload", default="none", choices=OFFLOAD_MODES,
                   help="keep weights on the CPU between calls (FLUX.1 / SD3.5 on a small GPU): model = each "
                   "component (text encoders, transformer, VAE) on the GPU only for its own calls; sequential = each "
                   "submodule (least memory, slowest); implies --no-fuse (docs/flow-models.md)")
    m.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images on small GPUs)")
    m.add_argument("--vae-slicing", action="store_true", help="decode a batch one image at a time")
    m.add_argument("--no-fuse", action="store_true",
                   help="keep the LoRA branches unfused: no extra weight copies (about 2 UNets less memory), slower")
    m.add_argument("--vae", default=None, metavar="PATH_OR_HUB_ID",
                   help="a VAE folder replacing the model's, e.g. an fp16-safe SDXL VAE (madebyollin/sdxl-vae-"
                   "fp16-fix; without one SDXL's VAE runs in fp16 and an overflowing batch again in fp32)")
    add_compile(m)
    add_threads(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def add_compile(parser) -> None:
    """--compile [MODE], the one declaration (edit, generate, invert, bench, serve)."""
    parser.add_argument("--compile", nargs="?", const="auto", default=None, choices=catalog.COMPILE_MODES,
                        metavar="MODE", help="torch.compile the UNets (MODE: auto = reduce-overhead / CUDA graphs on "
                        "CUDA, default on a CPU; or " + ", ".join(catalog.COMPILE_MODES[1:]) + "); the first edit of "
                        "each shape compiles (minutes on a CPU), later ones reuse the graphs")


def load_pipeline(args, **overrides):
    """The `icd.pipeline.Pipeline` of the model options (`add_model_options`), option errors as one line."""
    start_compute(args)
    from icd.pipeline import Pipeline  # heavy (torch, diffusers): --help and usage errors never get here
    from icd.runtime import check_device  # with the pipeline, as above

    with library_errors():  # an unknown --device / --boundaries, cuda without a GPU
        check_device(args.device)
        device = "cuda" if args.device == "auto" and _cuda() else "cpu" if args.device == "auto" else args.device
        options = dict(unet=args.unet, adapters=args.adapters, lora_forward=args.lora_forward,
                       lora_reverse=args.lora_reverse, boundaries=args.boundaries, device=device, dtype=args.dtype,
                       vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing, fuse=not args.no_fuse,
                       vae=getattr(args, "vae", None), compile=getattr(args, "compile", None),
                       offload=getattr(args, "offload", "none"))
        return Pipeline.from_pretrained(args.model, **(options | overrides))


def fit_to_model(image, model, fit: str | None):
    """`image` (PIL) fitted to `model`: policy `fit`, default the model's (squares for the embedded model, the
    aspect kept at the native resolution for Stable Diffusion). On a shapes-world model, an image of another size or
    one whose content is far from the world (many colours, texture: `looks_like_shapes_world`) gets a one-line
    notice on stderr that says so and how to use a Stable Diffusion model."""
    side = model.image_size
    if fit == "aspect" and model.size_multiple is None:
        raise CLIError(f"--fit aspect needs a model that takes any size (Stable Diffusion); this one takes "
                       f"{side}x{side} only: use resize, center-crop or pad")
    fitted = fit_image(image, side, fit or model.default_fit, multiple=model.size_multiple or 8)
    if model.vocabulary is not None:  # a world model: say so once when the input is not a world image
        why = [f"a {image.width}x{image.height} image is resized to it"] if image.size != (side, side) else []
        if not looks_like_shapes_world(np.asarray(fitted)):
            why.append("this image has many colours or texture, unlike its flat-colour shapes")
        if why:
            print(f"notice: the built-in model is a {side}x{side} shapes-world model ({'; '.join(why)}); for photos "
                  "use a Stable Diffusion model: --model ... (docs/stable-diffusion.md)", file=sys.stderr)
    return fitted


def _cuda() -> bool:
    import torch  # heavy: only once a model loads

    return torch.cuda.is_available()


def quiet_libraries() -> None:
    """Keep transformers / diffusers to errors and drop their weight-loading progress bars (CLI only)."""
    import diffusers  # heavy (~5 s with transformers): only once a command starts computing (`start_compute`)
    import transformers  # heavy: as above (icd.pipeline imports both anyway)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
