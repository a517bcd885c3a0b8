"""Method names of the harness, read from the method registry (`icd.methods.REGISTRY`): a registered method's name,
then a step count K where its steps are free, ``:NAME`` for other iCD adapters where it runs on them, ``@S`` for a
strength where it takes one:

- ``icd``: the model's shipped iCD adapters (forward + reverse, their own step count);
  ``icd:NAME``: adapters given with ``--adapters NAME=DIR`` (ablation rows, other step counts).
- ``ddimK``: DDIM inversion and decoding with K steps on the original UNet (two-pass CFG when guided);
  ``gddimK``: the same on the guidance-distilled UNet (guidance is an input, one call per step).
- ``npiK``: negative-prompt inversion; ``ntiK``: null-text inversion (10 inner Adam steps per step, early stop).
- ``sdeditK@S`` (editing only): SDEdit at strength S in (0, 1] with the teacher's K DDIM steps (only those below
  t_S run: about K S UNet calls, no inversion); ``sdedit-icd@S`` (``sdedit-icd:NAME@S``): SDEdit through the iCD
  reverse model's remaining jumps. Without ``@S`` the method's default strength (`icd.methods.DEFAULT_STRENGTH`).
- ``ip2pK`` (editing only): InstructPix2Pix (`icd.editing.ip2p`) with K DDIM steps (K UNet calls: the three
  two-way guidance rows are one batched call; 0 to "invert"); without K, IP2P's usual 100 or each ``--steps-list``.
- ``vae`` (inversion only, the bench's own row): the autoencoder alone, encode then decode (0 UNet calls): the
  ceiling of every latent method's reconstruction.
A method without K takes its default step count (50 for the DDIM family), or each value of ``--steps-list`` (the
step ablation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from icd.methods import REGISTRY

BENCH_ONLY = ("vae",)  # rows the harness measures itself, not registered methods
_SUFFIX = re.compile(r"^(\d+)?(?::([A-Za-z0-9_.-]+))?(?:@([^,@]*))?$")  # K, :NAME, @S after a method's name


@dataclass(frozen=True)
class BenchMethod:
    name: str  # as written in results.json
    method: str  # the registered method that runs it (or a `BENCH_ONLY` row)
    steps: int | None = None  # None: the method's own step count (the adapters')
    adapters: str | None = None  # icd:NAME -> NAME
    strength: float | None = None  # SDEdit's start noise level (None: the method's default)


def known_names() -> tuple[str, ...]:
    """Every name a method row can start with: the registered methods and the bench's own rows."""
    return (*REGISTRY.names(), *BENCH_ONLY)


def parse_methods(text: str, *, steps_list: list[int] | None = None, allowed: tuple[str, ...] | None = None,
                  adapters: dict[str, str] | None = None, stepped: bool = True) -> list[BenchMethod]:
    """``"icd,ddim50,ddim4,nti"`` -> methods; a method without a step count expands over `steps_list`. `allowed`:
    the methods this benchmark measures (default: every one). `stepped` False: the task runs no sampler (the
    guidance benchmark), so names carry no step count."""
    allowed = known_names() if allowed is None else allowed
    out: list[BenchMethod] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        out += _parse(item, steps_list=steps_list, allowed=allowed, adapters=adapters or {}, stepped=stepped)
    if not out:
        raise ValueError("--methods names no method")
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--methods names {', '.join(dupes)} twice")
    return out


def _split(item: str) -> tuple[str, re.Match] | None:
    """(method name, match of the rest) for the longest known name `item` starts with, or None."""
    for name in sorted(known_names(), key=len, reverse=True):
        if item.startswith(name):
            rest = _SUFFIX.match(item[len(name):])
            if rest is not None:
                return name, rest
    return None


def _parse(item: str, *, steps_list, allowed, adapters: dict[str, str], stepped: bool) -> list[BenchMethod]:
    found = _split(item)
    if found is None:
        raise ValueError(f"unknown method {item!r}; write one of {', '.join(known_names())}, with a step count K "
                         "where the steps are free (ddim50), :NAME for other iCD adapters (icd:NAME) and @S for a "
                         "strength (sdedit50@0.6)")
    family, rest = found
    if family not in allowed:
        raise ValueError(f"method {item!r} is not measured by this benchmark; choose from {', '.join(allowed)}")
    k, name, s = rest.groups()
    if family in BENCH_ONLY:
        if rest.group(0):
            raise ValueError(f"method {item!r}: {family} takes no step count, adapters or strength")
        return [BenchMethod(item, family, 0)]
    method = REGISTRY.get(family)
    if k is not None and (method.own_steps or not stepped):
        why = "its adapters' step count" if method.own_steps else "this benchmark takes no step count"
        raise ValueError(f"method {item!r}: {family} runs {why}; write {family}")
    if name is not None and method.unet != "icd":
        raise ValueError(f"method {item!r}: {family} runs no iCD adapters (:NAME)")
    if name is not None and name not in adapters:
        raise ValueError(f"method {item!r} needs --adapters {name}=DIR")
    if s is not None and not method.takes_strength:
        raise ValueError(f"method {item!r}: {family} takes no strength (@S)")
    strength = _strength(item, s)
    if method.own_steps:
        return [BenchMethod(item, family, None, name, strength)]
    if not stepped:
        if steps_list:
            raise ValueError(f"method {item!r}: this benchmark takes no step count")
        return [BenchMethod(family, family, None)]
    steps = [int(k)] if k is not None else steps_list or [method.default_steps]
    if min(steps) < 1:
        raise ValueError(f"method {item!r}: the step count must be >= 1")
    suffix = "" if s is None else f"@{s}"
    return [BenchMethod(f"{family}{n}{suffix}", family, n, None, strength) for n in steps]


def _strength(item: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        strength = float(text)
    except ValueError:
        strength = math.nan
    if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
        raise ValueError(f"method {item!r}: the strength after @ must lie in (0, 1]")
    return strength


def parse_steps_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps-list must be comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise ValueError(f"--steps-list must hold step counts >= 1, got {text!r}")
    return steps
