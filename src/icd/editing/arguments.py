"""The checks of `icd.pipeline.Pipeline`'s arguments that only the editing layer can make (the rest of the Python
API's input layer is `icd.inputs`): the inversion (its type, and that it fits the model), the target prompts, the
controls and a generation size, each refused with a one-line TypeError / ValueError naming the argument."""

from __future__ import annotations

from icd.editing.controllers import P2PControls
from icd.editing.edit import EditControls, flatten_targets
from icd.editing.inversion import Inversion, InversionError, check_model_record
from icd.inputs import as_targets, check_blend_words
from icd.models.base import LatentDiffusion


def check_inversion_type(inversion) -> Inversion:
    """`inversion` itself; TypeError (saying how to get one) when it is not an `Inversion` (e.g. a path)."""
    if not isinstance(inversion, Inversion):
        raise TypeError(f"inversion must be an Inversion (Pipeline.invert, or Inversion.load(path) for a saved one), "
                        f"got {type(inversion).__name__}")
    return inversion


def check_edit_arguments(inversion, target_prompts, controls, *, controls_type: type = EditControls
                         ) -> list[str | list[str]]:
    """The checked target prompts of an edit of `inversion` with `controls` (`icd.inputs.as_targets`): controls
    are None or a `controls_type` (the method's: `EditControls`, IP2P's `IP2PControls`), and P2P blend words fit the
    targets (`icd.inputs.check_blend_words`)."""
    check_inversion_type(inversion)
    targets = as_targets(target_prompts)
    if controls is not None and not isinstance(controls, controls_type):
        raise TypeError(f"controls for method {inversion.method} must be {controls_type.__name__} or None, got "
                        f"{type(controls).__name__}")
    p2p = getattr(controls, "p2p", None)
    if isinstance(p2p, P2PControls):
        n_targets = len(flatten_targets(targets, len(inversion.prompts))[0])
        check_blend_words(p2p.blend_words, n_targets, name="controls.p2p.blend_words")
    return targets


def check_fits(inversion: Inversion, model: LatentDiffusion, *, record: dict) -> None:
    """ValueError unless `inversion` fits `model`, which serves its method: the model that made it
    (`check_model_record` against `record`; an inversion saved before records existed has none and skips this), this
    model's latent shape, one latent per time. What else a method's record must satisfy its method checks
    (`icd.methods.Method.check_inversion`: iCD's encoding times, SDEdit's start time, IP2P's layout)."""
    check_model_record(inversion, record)
    latent = model.latent_shape()
    shape = tuple(inversion.noise.shape[1:])
    if model.size_multiple is not None and len(shape) == 3 and shape[0] == latent[0]:
        latent = model.latent_shape(shape[1] * model.vae_factor, shape[2] * model.vae_factor)  # any photo size
    if shape != latent:
        raise InversionError(f"this inversion's latents are {tuple(inversion.noise.shape[1:])}, the model's "
                             f"{latent}: it was made with another model ({inversion.settings.get('model', '?')})")
    if len(inversion.latents) != len(inversion.timesteps):
        raise ValueError("this inversion is malformed: one latent per timestep expected")


def generation_shape(model: LatentDiffusion, height: int | None, width: int | None) -> tuple[int, int, int]:
    """The latent shape of `model`'s images of height x width (None: the native square); ValueError naming
    height and width when the model cannot make that size."""
    if (height or width) and (model.size_multiple is None or (height or 0) % model.size_multiple
                              or (width or 0) % model.size_multiple):
        raise ValueError(f"height and width must be multiples of {model.size_multiple} (this model: "
                         f"{model.image_size} x {model.image_size} only)" if model.size_multiple else
                         f"this model generates {model.image_size} x {model.image_size} images only")
    return model.latent_shape(height, width)
