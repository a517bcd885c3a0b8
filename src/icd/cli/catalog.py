"""What the command line needs before any model: the methods' menu and the options' defaults, light to import.

`icd --help`, `icd CMD --help`, a one-line error and `icd world …` must answer without torch or diffusers (~6-9 s
to import on a small CPU). The truth lives in the library (`icd.methods`, the controls' dataclasses,
`icd.bench.BenchOptions`, `icd.samplers`), whose modules import torch; this module copies what the parsers show and
check, and tests/test_startup.py compares every copy with its source. Once `icd.methods` is imported (a test or a
plug-in registered a method in this process), the live registry answers instead of the table.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

TASKS = ("invert", "reconstruct", "edit", "generate")  # icd.methods.TASKS
DEFAULT_GUIDANCE = {"invert": 0.0, "edit": 1.0, "generate": 1.0}  # icd.methods.DEFAULT_GUIDANCE
DEFAULT_RENOISE = 1.0  # icd.methods.DEFAULT_RENOISE
DEFAULT_DDIM_RULE = "reference"  # icd.methods.DEFAULT_DDIM_RULE
DEFAULT_STRENGTH = 0.4  # icd.methods.DEFAULT_STRENGTH
DDIM_RULES = ("start", "reference")  # icd.samplers.DDIM_RULES
P2P = dict(cross_replace=0.3, self_replace=0.6, blend_threshold=0.3)  # icd.editing.controllers.P2PControls
MASACTRL = dict(start_t=920, start_layer=None)  # icd.editing.controllers.MasaCtrlControls
EDIT = dict(guidance=None, tau=None)  # icd.editing.edit.EditControls
BENCH_TASKS = ("inversion", "editing", "generation", "guidance")  # icd.bench.TASKS
BENCH = dict(n=20, methods=None, seed_start=None, kinds=None, steps_list=None, model="embedded", ip2p=None,
             guidance=None, tau=None, renoise=None, ddim_rule="reference", batch=50, n_timing=5, examples=2,
             pie_bench=None, lpips=None, clip=None, dino=None, device="auto")  # icd.bench.BenchOptions
TRAINERS = ("vae", "judge", "teacher", "guidance", "icd", "ip2p", "flow_teacher")  # icd.cli.train.trainers()


@dataclass(frozen=True)
class MethodInfo:
    """The attributes of an `icd.methods.Method` that the parsers and the checks before the model read."""

    name: str
    summary: str
    tasks: tuple[str, ...]
    attention_control: bool = True
    takes_tau: bool = True
    takes_strength: bool = False
    options: tuple[str, ...] = ()
    weights: str | None = None


_ALL, _EDIT, _RECON = TASKS, ("invert", "edit"), ("invert", "reconstruct", "edit")
BUILTIN = (  # icd.methods.BUILTIN, in menu order
    MethodInfo("icd", "forward + reverse consistency models (iCD)", _ALL),
    MethodInfo("gddim", "DDIM on the guidance-distilled UNet", ("invert", "reconstruct", "generate")),
    MethodInfo("ddim", "DDIM, two-pass classifier-free guidance", _ALL),
    MethodInfo("npi", "negative-prompt inversion", _EDIT),
    MethodInfo("nti", "null-text inversion", _EDIT),
    MethodInfo("sdedit", "SDEdit with the teacher's DDIM steps", _EDIT, attention_control=False,
               takes_strength=True),
    MethodInfo("sdedit-icd", "SDEdit with the iCD reverse model's jumps", _EDIT, attention_control=False,
               takes_strength=True),
    MethodInfo("ip2p", "InstructPix2Pix trained on the teacher's edits", _EDIT, attention_control=False,
               takes_tau=False, options=("instruction", "image_guidance"), weights="ip2p"),
    MethodInfo("renoise", "the reverse model inverted by ReNoise (averaged re-noising fixed point, 35 + 4 calls)",
               _RECON),
    MethodInfo("renoise-4call", "ReNoise at one call per step (K = 0: 4 + 4 calls)", _RECON),
    MethodInfo("gnri", "the reverse model inverted by Newton-Raphson (GNRI, 8 + 4 calls)", _RECON),
    MethodInfo("gnri-4call", "GNRI at one iteration per step (4 + 4 calls)", _RECON),
)


def methods(task: str | None = None) -> list:
    """The methods serving `task` (all: None): the live registry's once `icd.methods` is imported, else
    `BUILTIN`'s (a fresh process registers exactly those)."""
    if "icd.methods" in sys.modules:
        from icd.methods import REGISTRY  # already imported: free

        return REGISTRY.methods(task)
    return [m for m in BUILTIN if task is None or task in m.tasks]


def names(task: str | None = None, *, strength: bool | None = None, option: str | None = None) -> list[str]:
    """As `icd.methods.Registry.names`."""
    return [m.name for m in methods(task) if (strength is None or m.takes_strength == strength)
            and (option is None or option in m.options)]


def get(name: str, task: str | None = None):
    """As `icd.methods.Registry.get`: the method `name` (serving `task`); ValueError listing the names."""
    for m in methods(task):
        if m.name == name:
            return m
    raise ValueError(f"unknown method {name!r}{f' for {task}' if task else ''}; choose from {', '.join(names(task))}")


def check_strength(strength: float) -> None:
    """As `icd.methods.sdedit.check_strength`: ValueError unless `strength` lies in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength (--strength) must lie in (0, 1], got {strength}")
