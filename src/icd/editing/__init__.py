"""Inversion and editing: controls, attention control, the edit loop and the saved `Inversion` (the pipeline that
runs them is `icd.pipeline.Pipeline`)."""

from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.editing.inversion import Inversion

__all__ = ["EditControls", "Inversion", "MasaCtrlControls", "P2PControls"]
