"""Inversion and editing: `Editor` (invert / edit), controls, and the saved `Inversion`."""

from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.editor import EditControls, Editor, EditResult
from icd.editing.inversion import Inversion

__all__ = ["EditControls", "EditResult", "Editor", "Inversion", "MasaCtrlControls", "P2PControls"]
