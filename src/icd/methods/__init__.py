"""Editing methods as objects and the one registry that the pipeline, the CLI, the bench and the web page read
(`icd.methods.base`, `icd.methods.registry`). A method is one module here and one entry of `BUILTIN`: its menu
(name, summary, tasks, the controls it takes) and its class, which takes the menu from the entry.

Importing this package is light (no torch): `BUILTIN` and `REGISTRY` answer the command line's menus and checks;
a method's module is imported when its object is first asked for (`REGISTRY.get`), and the heavy names below
(`Method`, `Settings`, the results, the defaults) when first read (PEP 562).
"""

from icd.methods.registry import REGISTRY, TASKS, Entry, Registry

_ALL, _EDIT, _RECON = TASKS, ("invert", "edit"), ("invert", "reconstruct", "edit")
_VP, _FLOW = ("vp",), ("flow",)  # the model kinds of a method that runs on one kind only
BUILTIN = (  # the order menus list them in
    Entry("icd", "icd.methods.icd:ICD", "forward + reverse consistency models (iCD)", _ALL),
    Entry("gddim", "icd.methods.ddim:GuidedDDIM", "DDIM on the guidance-distilled UNet",
          ("invert", "reconstruct", "generate")),
    Entry("ddim", "icd.methods.ddim:DDIM", "DDIM, two-pass classifier-free guidance", _ALL),
    Entry("npi", "icd.methods.npi:NPI", "negative-prompt inversion", _EDIT),
    Entry("nti", "icd.methods.nti:NTI", "null-text inversion", _EDIT),
    Entry("sdedit", "icd.methods.sdedit:SDEdit", "SDEdit with the teacher's DDIM steps", _EDIT,
          attention_control=False, takes_strength=True),
    Entry("sdedit-icd", "icd.methods.sdedit:SDEditICD", "SDEdit with the iCD reverse model's jumps", _EDIT,
          attention_control=False, takes_strength=True),
    Entry("ip2p", "icd.methods.ip2p:IP2P", "InstructPix2Pix trained on the teacher's edits", _EDIT,
          attention_control=False, takes_tau=False, options=("instruction", "image_guidance"), weights="ip2p",
          models=_VP),
    # the reverse model alone, inverted by ReNoise (methods/renoise.py) and by Newton-Raphson (methods/gnri.py)
    Entry("renoise", "icd.methods.renoise:ReNoise",
          "the reverse model inverted by ReNoise (averaged re-noising fixed point, 35 + 4 calls)", _RECON),
    Entry("renoise-4call", "icd.methods.renoise:ReNoise4Call", "ReNoise at one call per step (K = 0: 4 + 4 calls)",
          _RECON),
    Entry("gnri", "icd.methods.gnri:GNRI", "the reverse model inverted by Newton-Raphson (GNRI, 8 + 4 calls)",
          _RECON),
    Entry("gnri-4call", "icd.methods.gnri:GNRI4Call", "GNRI at one iteration per step (4 + 4 calls)", _RECON),
    # the rectified-flow baselines (a flow model only: --model embedded-flow; docs/baselines.md §13-16)
    Entry("flow-ode", "icd.methods.flow_ode:FlowODE", "Euler flow-ODE inversion and decoding (50 + 50 calls)",
          _RECON, models=_FLOW),
    Entry("rf-inversion", "icd.methods.rf_inversion:RFInversion",
          "RF-Inversion: controlled forward / reverse ODEs (gamma 0.5, eta 0.9; 28 + 28 calls)", _RECON,
          attention_control=False, takes_tau=False, models=_FLOW),
    Entry("flowedit", "icd.methods.flowedit:FlowEdit",
          "FlowEdit: inversion-free source-to-target ODE (24 calls of 28 steps)", _EDIT, attention_control=False,
          takes_tau=False, models=_FLOW),
    Entry("fireflow", "icd.methods.fireflow:FireFlow",
          "FireFlow: midpoint flow solver reusing its velocity (8 + 8 steps, 9 + 9 calls)", _RECON, models=_FLOW),
)
for _entry in BUILTIN:
    REGISTRY.register(_entry)

_FROM_BASE = ("DEFAULT_DDIM_RULE", "DEFAULT_GUIDANCE", "DEFAULT_RENOISE", "DEFAULT_STEPS", "EditResult", "Generation",
              "InversionRun", "Method", "Reconstruction", "Settings")


def __getattr__(name: str):
    """The heavy names, imported on first read (they import torch)."""
    if name in _FROM_BASE:
        from icd.methods import base  # heavy (torch): on first read only

        return getattr(base, name)
    if name == "DEFAULT_STRENGTH":
        from icd.methods import sdedit  # heavy (torch): on first read only

        return sdedit.DEFAULT_STRENGTH
    raise AttributeError(f"module 'icd.methods' has no attribute {name!r}")


__all__ = ["BUILTIN", "DEFAULT_DDIM_RULE", "DEFAULT_GUIDANCE", "DEFAULT_RENOISE", "DEFAULT_STEPS", "DEFAULT_STRENGTH",
           "REGISTRY", "TASKS", "Entry", "EditResult", "Generation", "InversionRun", "Method", "Reconstruction",
           "Registry", "Settings"]
