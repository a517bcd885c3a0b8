"""Method names of the harness: ``icd``, ``icd:NAME`` (extra adapters), ``ddimK``, ``gddimK``, ``npiK``, ``ntiK``,
``sdeditK@S``, ``sdedit-icd@S``, ``ip2pK``.

- ``icd``: the model's shipped iCD adapters (forward + reverse, their own step count);
  ``icd:NAME``: adapters given with ``--adapters NAME=DIR`` (ablation rows, other step counts).
- ``ddimK``: DDIM inversion and decoding with K steps on the original UNet (two-pass CFG when guided);
  ``gddimK``: the same on the guidance-distilled UNet (guidance is an input, one call per step).
- ``npiK``: negative-prompt inversion; ``ntiK``: null-text inversion (10 inner Adam steps per step, early stop).
- ``sdeditK@S`` (editing only): SDEdit at strength S in (0, 1] with the teacher's K DDIM steps (only those below
  t_S run: about K S UNet calls, no inversion); ``sdedit-icd@S`` (``sdedit-icd:NAME@S``): SDEdit through the iCD
  reverse model's remaining jumps. Without ``@S`` the pipeline's default strength (`icd.pipeline.DEFAULT_STRENGTH`).
- ``ip2pK`` (editing only): InstructPix2Pix (`icd.editing.ip2p`) with K DDIM steps (K UNet calls: the three
  two-way guidance rows are one batched call; 0 to "invert"); without K, IP2P's usual 100 or each ``--steps-list``.
- ``vae`` (inversion only): the autoencoder alone, encode then decode (0 UNet calls): the ceiling of every latent
  method's reconstruction.
A family without K takes 50 steps, or each value of ``--steps-list`` (the step ablation).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

FAMILIES = ("icd", "ddim", "gddim", "npi", "nti", "vae", "sdedit", "sdedit-icd", "ip2p")
_PATTERN = re.compile(r"^(icd)(?::([A-Za-z0-9_.-]+))?$|^(ddim|gddim|npi|nti|ip2p)(\d+)?$|^(vae)$")
_SDEDIT = re.compile(r"^(?:(sdedit)(\d+)?|(sdedit-icd)(?::([A-Za-z0-9_-]+))?)(?:@([^,@]*))?$")
DEFAULT_STEPS = 50
FAMILY_STEPS = {"ip2p": 100}  # a family's own default step count (IP2P's usual sampler length)


@dataclass(frozen=True)
class Method:
    name: str  # as written in results.json
    family: str  # one of FAMILIES: the `icd.pipeline.METHODS` name that runs it
    steps: int | None = None  # None: the adapters' own step count (icd)
    adapters: str | None = None  # icd:NAME -> NAME
    strength: float | None = None  # SDEdit's start noise level (None: the pipeline's default)


def parse_methods(text: str, *, steps_list: list[int] | None = None, allowed: tuple[str, ...] = FAMILIES,
                  adapters: dict[str, str] | None = None, stepped: bool = True) -> list[Method]:
    """``"icd,ddim50,ddim4,nti"`` -> methods; a family without a step count expands over `steps_list`.
    `stepped` False: the task runs no sampler (the guidance benchmark), so names carry no step count."""
    out: list[Method] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item.startswith("sdedit"):
            out += _sdedit(item, steps_list=steps_list, allowed=allowed, adapters=adapters or {})
            continue
        m = _PATTERN.match(item)
        if m is None:
            raise ValueError(f"unknown method {item!r}; write icd, icd:NAME, vae, sdeditK@S, sdedit-icd@S or one of "
                             f"ddim, gddim, npi, nti, ip2p with an optional step count (e.g. ddim50)")
        family = m.group(1) or m.group(3) or m.group(5)
        if family not in allowed:
            raise ValueError(f"method {item!r} is not measured by this benchmark; choose from {', '.join(allowed)}")
        if family == "vae":  # the autoencoder alone: what any latent method's reconstruction is bounded by
            out.append(Method(item, "vae", 0))
            continue
        if family == "icd":
            name = m.group(2)
            if name is not None and name not in (adapters or {}):
                raise ValueError(f"method {item!r} needs --adapters {name}=DIR")
            out.append(Method(item, "icd", None, name))
            continue
        if not stepped:
            if m.group(4) is not None or steps_list:
                raise ValueError(f"method {item!r}: this benchmark takes no step count")
            out.append(Method(family, family, None))
            continue
        if m.group(4) is not None:
            steps = [int(m.group(4))]
        else:
            steps = steps_list or [FAMILY_STEPS.get(family, DEFAULT_STEPS)]
        for k in steps:
            if k < 1:
                raise ValueError(f"method {item!r}: the step count must be >= 1")
            out.append(Method(f"{family}{k}", family, k))
    if not out:
        raise ValueError("--methods names no method")
    names = [m.name for m in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"--methods names {', '.join(dupes)} twice")
    return out


def _sdedit(item: str, *, steps_list: list[int] | None, allowed: tuple[str, ...],
            adapters: dict[str, str]) -> list[Method]:
    """``sdedit50@0.6`` / ``sdedit@0.6`` (over `steps_list`) / ``sdedit-icd@0.6`` / ``sdedit-icd:NAME`` -> methods."""
    m = _SDEDIT.match(item)
    if m is None:
        raise ValueError(f"unknown method {item!r}; write sdeditK@S (teacher, K DDIM steps) or sdedit-icd@S (iCD "
                         "reverse model), S the strength in (0, 1] (e.g. sdedit50@0.6)")
    family = m.group(1) or m.group(3)
    if family not in allowed:
        raise ValueError(f"method {item!r} is not measured by this benchmark; choose from {', '.join(allowed)}")
    strength = None
    if m.group(5) is not None:
        try:
            strength = float(m.group(5))
        except ValueError:
            strength = math.nan
        if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
            raise ValueError(f"method {item!r}: the strength after @ must lie in (0, 1]")
    suffix = "" if strength is None else f"@{m.group(5)}"
    if family == "sdedit-icd":
        name = m.group(4)
        if name is not None and name not in adapters:
            raise ValueError(f"method {item!r} needs --adapters {name}=DIR")
        return [Method(item, family, None, name, strength)]
    steps = [int(m.group(2))] if m.group(2) is not None else steps_list or [DEFAULT_STEPS]
    if min(steps) < 1:
        raise ValueError(f"method {item!r}: the step count must be >= 1")
    return [Method(f"sdedit{k}{suffix}", family, k, None, strength) for k in steps]


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
