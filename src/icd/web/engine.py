"""The model behind the page: one call at a time (a lock; later requests queue), the inversion cache, progress.

An inversion is keyed by the fitted image's bytes, the source prompt and what the inversion depends on (method,
steps, seed; NTI also its guidance), so a new target for an unchanged image and source prompt costs only the reverse
steps (4 UNet calls with iCD).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.editing.tokens import is_word_swap
from icd.imageio import FITS, fit_image
from icd.models.base import PromptError
from icd.pipeline import Pipeline

WEB_METHODS = ("icd", "ddim", "npi", "nti")
CACHE_SIZE = 8


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
    reweight: dict[str, float] = field(default_factory=dict)
    masactrl: bool = False
    fit: str = "resize"


def png_data_url(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_reweight(text: str) -> dict[str, float]:
    """'red=2, star=0.5' -> {'red': 2.0, 'star': 0.5}; ValueError with the bad item."""
    out = {}
    for item in text.replace(",", " ").split():
        word, sep, value = item.partition("=")
        try:
            if not sep or not word:
                raise ValueError
            out[word.lower()] = float(value)
        except ValueError:
            raise ValueError(f"reweight expects WORD=FACTOR items, got {item!r}") from None
    return out


def blend_words(words: tuple[str, ...], source: str, target: str):
    """Blend words split into (source words, target words); ValueError for a word in neither prompt."""
    if not words:
        return None
    src, tgt = source.lower().split(), target.lower().split()
    words = tuple(w.lower() for w in words)
    unknown = [w for w in words if w not in src and w not in tgt]
    if unknown:
        raise ValueError(f"blend word(s) {', '.join(unknown)} appear in neither prompt")
    return tuple(w for w in words if w in src), tuple(w for w in words if w in tgt)


class Engine:
    """Runs edits for the page; `run` is thread-safe (serialised by a lock) and `progress` never blocks."""

    def __init__(self, pipe: Pipeline, *, cache_size: int = CACHE_SIZE):
        self.pipe = pipe
        self.lock = threading.Lock()
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self.cache_size = cache_size
        self._waiting = 0  # requests queued behind the lock
        self._count_lock = threading.Lock()
        self._state: dict = {"busy": False}

    @property
    def image_size(self) -> int:
        return self.pipe.model.image_size

    @property
    def fits(self) -> tuple[str, ...]:
        """The fit policies this model takes (``aspect`` only where any image size is accepted)."""
        return tuple(f for f in FITS if f != "aspect" or self.pipe.model.size_multiple is not None)

    def progress(self) -> dict:
        state = dict(self._state)
        if state.get("busy"):
            state["elapsed"] = round(time.perf_counter() - state.pop("t0"), 2)
            state["unet_calls"] = self.pipe.model.counter.calls - state.pop("calls0")
        state["queued"] = self._waiting
        return state

    def _controls(self, req: EditRequest) -> EditControls:
        if req.masactrl:
            return EditControls(guidance=req.guidance, tau=req.tau, p2p=None, masactrl=MasaCtrlControls())
        p2p = P2PControls(cross_replace=req.cross_replace, self_replace=req.self_replace, reweight=req.reweight,
                          blend_words=blend_words(req.blend, req.source, req.target))
        return EditControls(guidance=req.guidance, tau=req.tau, p2p=p2p)

    def _check(self, req: EditRequest) -> EditControls:
        """Every mistake the user can fix, before any model call: ValueError / PromptError."""
        if not req.source.strip() or not req.target.strip():
            raise PromptError("the source or the target prompt is empty")
        if req.method not in WEB_METHODS:
            raise ValueError(f"unknown method {req.method!r}; choose from {', '.join(WEB_METHODS)}")
        if req.fit not in self.fits:
            raise ValueError(f"unknown fit {req.fit!r}; choose from {', '.join(self.fits)}")
        self.pipe.model.check_prompts([req.source, req.target])  # unknown words, with the closest known ones
        self.pipe.settings(req.method, "edit", guidance=req.guidance, tau=req.tau, steps=req.steps)
        return self._controls(req)

    def _inversion(self, image: np.ndarray, req: EditRequest):
        key = (hashlib.sha256(image.tobytes()).hexdigest(), image.shape, req.source, req.method, req.steps,
               req.seed if req.method == "icd" else None, req.guidance if req.method == "nti" else None)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key], True
        self._state["stage"] = "inverting"
        inv = self.pipe.invert(image[None], [req.source], method=req.method, steps=req.steps, seed=req.seed,
                               guidance=req.guidance)
        self.cache[key] = inv
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return inv, False

    def run(self, req: EditRequest) -> dict:
        controls = self._check(req)
        model = self.pipe.model
        image = np.asarray(fit_image(req.image, self.image_size, req.fit, multiple=model.size_multiple or 8))
        with self._count_lock:
            self._waiting += 1
        try:
            self.lock.acquire()
        finally:
            with self._count_lock:
                self._waiting -= 1
        try:
            counter = self.pipe.model.counter
            self._state = {"busy": True, "stage": "inverting", "method": req.method, "t0": time.perf_counter(),
                           "calls0": counter.calls}
            c0, t0 = counter.calls, time.perf_counter()
            inversion, cached = self._inversion(image, req)
            c1, t1 = counter.calls, time.perf_counter()
            self._state["stage"] = "editing"
            result = self.pipe.edit(inversion, [req.target], controls)
            t2 = time.perf_counter()
        finally:
            self._state = {"busy": False}
            self.lock.release()
        notice = None
        if controls.p2p is not None and not is_word_swap(req.source, req.target):
            notice = "the prompts have different word counts: P2P refine instead of replace"
        return {"source": png_data_url(image), "reconstruction": png_data_url(result.reconstructions[0]),
                "edit": png_data_url(result.images[0]), "method": req.method, "control": controls.control,
                "cached": cached, "nfe_invert": c1 - c0, "nfe_edit": result.nfe, "nfe": c1 - c0 + result.nfe,
                "seconds_invert": round(t1 - t0, 3), "seconds_edit": round(t2 - t1, 3), "notice": notice}
