"""Editing methods as objects and the one registry that the pipeline, the CLI, the bench and the web page read
(`icd.methods.base`). A method is one module here and one entry of `BUILTIN`."""

from icd.methods.base import (
    DEFAULT_DDIM_RULE,
    DEFAULT_GUIDANCE,
    DEFAULT_RENOISE,
    DEFAULT_STEPS,
    REGISTRY,
    TASKS,
    EditResult,
    Generation,
    InversionRun,
    Method,
    Reconstruction,
    Registry,
    Settings,
)
from icd.methods.ddim import DDIM, GuidedDDIM
from icd.methods.gnri import GNRI, GNRI4Call
from icd.methods.icd import ICD
from icd.methods.ip2p import IP2P
from icd.methods.npi import NPI
from icd.methods.nti import NTI
from icd.methods.renoise import ReNoise, ReNoise4Call
from icd.methods.sdedit import DEFAULT_STRENGTH, SDEdit, SDEditICD

BUILTIN = (ICD(), GuidedDDIM(), DDIM(), NPI(), NTI(), SDEdit(), SDEditICD(), IP2P(),  # the order menus list them in
           ReNoise(), ReNoise4Call(),  # the reverse model alone, inverted by ReNoise (methods/renoise.py)
           GNRI(), GNRI4Call())  # ... and by Newton-Raphson (methods/gnri.py)
for _method in BUILTIN:
    REGISTRY.register(_method)

__all__ = ["BUILTIN", "DEFAULT_DDIM_RULE", "DEFAULT_GUIDANCE", "DEFAULT_RENOISE", "DEFAULT_STEPS", "DEFAULT_STRENGTH",
           "REGISTRY", "TASKS", "EditResult", "Generation", "InversionRun", "Method", "Reconstruction", "Registry",
           "Settings"]
