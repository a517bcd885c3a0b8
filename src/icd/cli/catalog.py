"""The options' defaults that the command line shows before any model, light to import.

`icd --help`, `icd CMD --help`, a one-line error and `icd world …` must answer without torch or diffusers (~6-9 s
to import on a small CPU). The methods' menu needs no copy: `icd.methods` is light (`icd.methods.REGISTRY` answers
from `BUILTIN`'s entries without importing a method's module). The option defaults live in modules that import
torch (`icd.methods.base`, the controls' dataclasses, `icd.bench.BenchOptions`, `icd.samplers`); this module
copies what the parsers show and check, and tests/test_startup.py compares every copy with its source.
"""

from __future__ import annotations

import math

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
             pie_bench=None, lpips=None, clip=None, dino=None, device="auto", compile=None)  # icd.bench.BenchOptions
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # compiled.MODES
TRAINERS = ("vae", "judge", "teacher", "guidance", "icd", "ip2p", "flow_teacher")  # icd.cli.train.trainers()


def check_strength(strength: float) -> None:
    """As `icd.methods.sdedit.check_strength`: ValueError unless `strength` lies in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not (
            math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ValueError(f"strength (--strength) must lie in (0, 1], got {strength}")
