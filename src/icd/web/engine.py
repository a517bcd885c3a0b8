"""The models behind the page: one call at a time (a lock; later requests queue), the inversion cache, progress.

The engine serves one or more pipelines by name (`icd serve` with no ``--model``: both built-in models, the
SD-shaped ``embedded`` and the rectified-flow ``embedded-flow``); each request names its model (the first one by
default), and each model's method menu is the registry's editing methods that run on it (`Engine.methods`).

An inversion is keyed by the fitted image's bytes, the source prompt and what the inversion depends on (method,
steps, seed; NTI also its guidance), so a new target for an unchanged image and source prompt costs only the reverse
steps (4 UNet calls with iCD).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import numpy as np
from PIL import Image

from icd.editing.edit import EditControls
from icd.editing.tokens import words as prompt_words
from icd.imageio import FITS, fit_image
from icd.methods import REGISTRY
from icd.pipeline import Pipeline
from icd.requests import AttentionRequest, edit_controls, refine_notice, run_edit
from icd.samplers import Cancelled, StopFn

CACHE_SIZE = 8
MAX_SEED = 2**64 - 1  # the range torch.Generator.manual_seed takes
LOCK_POLL_S = 0.05  # a queued request looks this often whether its client has left


class FieldError(ValueError):
    """A form field the page must refuse: 400 with `field` named in the message, which holds no server path."""

    def __init__(self, field: str, message: str):
        message = public_message(message)
        if field.replace("_", " ") not in message and field not in message:
            message = f"{field}: {message}"
        super().__init__(message)
        self.field = field


_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?(?:/[^\s/:'\"(),]+)+/?")  # an absolute (or ~, ./) path


def public_message(text: str) -> str:
    """`text`'s first line as the page may show it: no filesystem path (the server's install or model folders)."""
    line = text.strip().splitlines()[0] if text.strip() else "invalid value"
    return _PATH.sub("(a server path)", line)


@contextmanager
def field(name: str):
    """Report a ValueError raised inside as a `FieldError` of `name`."""
    try:
        yield
    except FieldError:
        raise
    except ValueError as e:
        raise FieldError(name, str(e)) from None


@dataclass(frozen=True)
class EditRequest:
    """One submit of the page's form (already parsed: numbers are numbers, empty optional fields None)."""

    image: Image.Image
    source: str
    target: str
    method: str = "icd"
    steps: int | None = None
    seed: int = 0
    guidance: float | None = None
    tau: float | None = None
    cross_replace: float = 0.3
    self_replace: float = 0.6
    blend: tuple[str, ...] = ()
    reweight: dict[str, float] = dataclass_field(default_factory=dict)
    masactrl: bool = False
    fit: str = "resize"
    model: str = ""  # a name the engine serves; empty: its first (default) model


def png_data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _named(message: str, fields: tuple[str, ...]) -> str:
    """The first of `fields` that `message` names (its first one if none)."""
    found = [(min(i for i in (message.find(f), message.find(f.replace("_", " "))) if i >= 0), f)
             for f in fields if f in message or f.replace("_", " ") in message]
    return min(found)[1] if found else fields[0]


def web_methods() -> list[str]:
    """The page's method menu, read from the registry: the editing methods that take its controls (attention
    control, guidance and tau; none of their own, no strength)."""
    return [m.name for m in REGISTRY.methods("edit")
            if m.attention_control and m.takes_tau and not m.options and not m.takes_strength]


class Engine:
    """Runs edits for the page; `run` is thread-safe (serialised by a lock) and `progress` never blocks.

    `pipes`: one pipeline, or several by the name the page shows (the first is the default model)."""

    def __init__(self, pipes: Pipeline | Mapping[str, Pipeline], *, cache_size: int = CACHE_SIZE):
        self.pipes: dict[str, Pipeline] = dict(pipes) if isinstance(pipes, Mapping) else {pipes.model.name: pipes}
        if not self.pipes:
            raise ValueError("pipes: the engine needs at least one model")
        self.default_model = next(iter(self.pipes))
        self.lock = threading.Lock()
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self.cache_size = cache_size
        self._waiting = 0  # requests queued behind the lock
        self._count_lock = threading.Lock()
        self._state: dict = {"busy": False}

    @property
    def pipe(self) -> Pipeline:
        """The default model's pipeline."""
        return self.pipes[self.default_model]

    def pipe_for(self, model: str = "") -> Pipeline:
        """The pipeline of `model` (empty: the default); `FieldError` naming ``model`` for one not served."""
        if model and model not in self.pipes:
            raise FieldError("model", f"unknown model {model[:40]!r}; choose from {', '.join(self.pipes)}")
        return self.pipes[model or self.default_model]

    def methods(self, model: str = "") -> list[str]:
        """The method menu of `model`: the page's methods (`web_methods`) that run on it (its model kind, and the
        iCD adapters where a method needs them)."""
        pipe = self.pipe_for(model)
        return [m for m in web_methods() if pipe.offers(m)]

    def image_size(self, model: str = "") -> int:
        return self.pipe_for(model).model.image_size

    def fits(self, model: str = "") -> tuple[str, ...]:
        """The fit policies `model` takes (``aspect`` only where any image size is accepted)."""
        return tuple(f for f in FITS if f != "aspect" or self.pipe_for(model).model.size_multiple is not None)

    def menus(self) -> list[dict]:
        """What the page shows for each model: its methods (with their summaries), fits, image size, vocabulary."""
        out = []
        for name, pipe in self.pipes.items():
            methods = self.methods(name)
            out.append({"name": name, "kind": pipe.model.kind, "family": pipe.model.family, "methods": methods,
                        "summaries": {m: REGISTRY.get(m).summary for m in methods}, "fits": list(self.fits(name)),
                        "image_size": self.image_size(name), "vocabulary": list(pipe.model.vocabulary or [])})
        return out

    def progress(self) -> dict:
        state = dict(self._state)
        if state.get("busy"):
            state["elapsed"] = round(time.perf_counter() - state.pop("t0"), 2)
            state["unet_calls"] = state.pop("counter").calls - state.pop("calls0")
        state["queued"] = self._waiting
        return state

    def _controls(self, req: EditRequest) -> EditControls:
        attention = AttentionRequest(cross_replace=req.cross_replace, self_replace=req.self_replace,
                                     reweight=req.reweight, blend=req.blend, masactrl=req.masactrl)
        return edit_controls(REGISTRY.get(req.method, "edit"), source=req.source, target=req.target,
                             guidance=req.guidance, tau=req.tau, attention=attention)

    def _check(self, req: EditRequest) -> EditControls:
        """Every mistake the user can fix, before any model call: a `FieldError` naming the form field."""
        pipe = self.pipe_for(req.model)
        for name in ("source", "target"):
            if not getattr(req, name).strip():
                raise FieldError(name, f"the {name} prompt is empty")
            with field(name):  # unknown words, with the closest known ones
                pipe.model.check_prompts([getattr(req, name)])
        methods = self.methods(req.model)
        if req.method not in methods:
            known = "unknown method" if req.method not in web_methods() else "the model does not run the method"
            raise FieldError("method", f"{known} {req.method[:40]!r}; choose from {', '.join(methods)}")
        fits = self.fits(req.model)
        if req.fit not in fits:
            raise FieldError("fit", f"unknown fit {req.fit[:40]!r}; choose from {', '.join(fits)}")
        if not 0 <= req.seed <= MAX_SEED:
            raise FieldError("seed", f"seed must be an integer in 0..2^64-1, got {req.seed}")
        try:
            pipe.settings(req.method, "edit", guidance=req.guidance, tau=req.tau, steps=req.steps)
        except ValueError as e:  # the message names the setting it refuses
            raise FieldError(_named(str(e), ("steps", "guidance", "tau")), str(e)) from None
        unknown = [w for w in req.reweight if w not in prompt_words(req.target)]
        if unknown and not req.masactrl:
            raise FieldError("reweight", f"reweight word(s) {', '.join(unknown)} are not in the target prompt")
        try:
            return self._controls(req)
        except ValueError as e:
            raise FieldError(_named(str(e), ("cross_replace", "self_replace", "reweight", "blend")), str(e)) from None

    def _inversion(self, image: np.ndarray, req: EditRequest, should_stop: StopFn | None = None):
        key = (req.model or self.default_model, hashlib.sha256(image.tobytes()).hexdigest(), image.shape, req.source,
               req.method, req.steps, *REGISTRY.get(req.method).inversion_key(seed=req.seed, guidance=req.guidance))
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], True
        self._state["stage"] = "inverting"
        inv = self.pipe_for(req.model).invert(image[None], [req.source], method=req.method, steps=req.steps,
                                              seed=req.seed, guidance=req.guidance, should_stop=should_stop)
        self.cache[key] = inv
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return inv, False

    def _acquire(self, should_stop: StopFn | None) -> None:
        """Take the lock, queued behind the running edit; `Cancelled` (lock not held) once `should_stop()` says the
        client has left, so an abandoned request never runs."""
        with self._count_lock:
            self._waiting += 1
        try:
            while not self.lock.acquire(timeout=LOCK_POLL_S if should_stop else -1):
                if should_stop():
                    raise Cancelled("cancelled while queued: the client left")
        finally:
            with self._count_lock:
                self._waiting -= 1
        if should_stop is not None and should_stop():
            self.lock.release()
            raise Cancelled("cancelled while queued: the client left")

    def run(self, req: EditRequest, *, should_stop: StopFn | None = None) -> dict:
        """Check `req`, wait for the model, invert (or take the cached inversion) and edit. `should_stop`: asked
        while queued and at every sampling step; True raises `icd.samplers.Cancelled` and nothing is cached."""
        controls = self._check(req)
        pipe = self.pipe_for(req.model)
        with field("image"):
            image = np.asarray(fit_image(req.image, pipe.model.image_size, req.fit,
                                         multiple=pipe.model.size_multiple or 8))
        self._acquire(should_stop)
        try:
            self._state = {"busy": True, "stage": "inverting", "method": req.method, "t0": time.perf_counter(),
                           "model": req.model or self.default_model, "counter": pipe.model.counter,
                           "calls0": pipe.model.counter.calls}
            run = run_edit(pipe, lambda: self._inversion(image, req, should_stop), [req.target], controls,
                           should_stop=should_stop, on_stage=lambda stage: self._state.update(stage=stage))
        finally:
            self._state = {"busy": False}
            self.lock.release()
        result = run.result
        return {"source": png_data_url(image), "reconstruction": png_data_url(result.reconstructions[0]),
                "edit": png_data_url(result.images[0]), **run.report(digits=3), "method": req.method,
                "model": req.model or self.default_model,
                "control": controls.control, "cached": run.cached,
                "notice": refine_notice(req.source, req.target, controls)}
