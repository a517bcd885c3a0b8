"""Where the package's shipped assets live: the embedded model folder and the world judge's weights."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EMBEDDED = "embedded"  # the name that selects the shipped model
EMBEDDED_FLOW = "embedded-flow"  # the name that selects the shipped flow model (FLUX-shaped; docs/flow.md)


def assets_dir() -> Path:
    return Path(str(resources.files("icd") / "assets"))


def embedded_model_path() -> Path:
    return assets_dir() / "embedded"


def embedded_flow_model_path() -> Path:
    """The embedded FLUX-shaped flow model (a diffusers FluxPipeline folder; docs/flow.md)."""
    return assets_dir() / "embedded-flow"


def embedded_judge_path() -> Path:
    return assets_dir() / "judge.safetensors"
