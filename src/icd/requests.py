"""The request layer the command line (`icd edit`) and the web page (`icd serve`) share: an edit request's prompts
and controls turned into its method's controls (`icd.methods.Method.controls`), the Prompt-to-Prompt refine notice,
and the run itself with its UNet calls and seconds per stage. A front end maps only its own inputs (options, form
fields) onto these, and their ValueErrors onto its own errors (exit 2, HTTP 400 naming the field).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.inversion import Inversion
from icd.editing.tokens import is_word_swap
from icd.methods import EditResult, Method
from icd.samplers import StopFn

REFINE_NOTICE = "the prompts have different word counts: P2P refine instead of replace"


def parse_reweight(items: str | Sequence[str] | None, *, name: str = "reweight") -> dict[str, float]:
    """``"red=2, star=0.5"`` (one text) or ``["red=2", "star=0.5"]`` -> {'red': 2.0, 'star': 0.5}; ValueError
    naming `name` and the bad item."""
    if items is None:
        return {}
    out = {}
    for item in items.replace(",", " ").split() if isinstance(items, str) else items:
        word, sep, value = item.partition("=")
        word = word.strip().lower()
        try:
            if not sep or not word:
                raise ValueError
            out[word] = float(value)
        except ValueError:
            raise ValueError(f"{name} expects WORD=FACTOR items, got {item!r}") from None
    return out


P2P_BLOCK_NAMES = ("all", "double", "single")  # icd.editing.joint_attention.BLOCK_CHOICES (that module is heavy)


def parse_blocks(text: str | None, *, name: str = "p2p_blocks"):
    """A transformer's P2P blocks as typed: None (the default choice), ``all`` / ``double`` / ``single``, or block
    indices ``"0,2,5"`` (double-stream blocks first) -> (0, 2, 5); ValueError naming `name` otherwise."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip().lower()
    if text in P2P_BLOCK_NAMES:
        return text
    try:
        blocks = tuple(int(b) for b in text.replace(",", " ").split())
    except ValueError:
        blocks = ()
    if not blocks or min(blocks) < 0:
        raise ValueError(f"{name} expects {', '.join(P2P_BLOCK_NAMES)} or block indices >= 0 such as 0,2,5; got "
                         f"{text[:40]!r}")
    return tuple(sorted(set(blocks)))


def blend_words(words: Sequence[str] | None, source: str, target: str):
    """Local-blend words split into (source words, target words), or None; ValueError for a word in neither
    prompt."""
    if not words:
        return None
    src, tgt = source.lower().split(), target.lower().split()
    words = tuple(w.lower() for w in words)
    unknown = [w for w in words if w not in src and w not in tgt]
    if unknown:
        raise ValueError(f"blend word(s) {', '.join(unknown)} appear in neither prompt")
    return tuple(w for w in words if w in src), tuple(w for w in words if w in tgt)


@dataclass(frozen=True)
class AttentionRequest:
    """The attention-control fields of a request: Prompt-to-Prompt (default), MasaCtrl or a plain prompt swap."""

    cross_replace: float = P2PControls.cross_replace
    self_replace: float = P2PControls.self_replace
    reweight: dict = field(default_factory=dict)
    blend: tuple[str, ...] = ()  # local-blend words from either prompt
    blend_threshold: float = P2PControls.blend_threshold
    p2p_blocks: str | tuple[int, ...] | None = None  # a transformer's controlled blocks (`parse_blocks`)
    mask: np.ndarray | None = None  # a user mask [H, W] (1 = may change) instead of blend words
    masactrl: bool = False
    masactrl_start_t: int = MasaCtrlControls.start_t
    masactrl_layer: int | None = MasaCtrlControls.start_layer
    swap: bool = False


def edit_controls(method: Method, *, source: str, target: str, guidance: float | None, tau: float | None,
                  attention: AttentionRequest = AttentionRequest(), **options):
    """`method`'s controls for a request: its attention control where it takes one (MasaCtrl, a prompt swap or
    Prompt-to-Prompt), with guidance, tau and its own `options` (IP2P's instruction and image guidance)."""
    if not method.attention_control:
        return method.controls(guidance=guidance, tau=tau, **options)
    p2p = masactrl = None
    if attention.masactrl:
        masactrl = MasaCtrlControls(start_t=attention.masactrl_start_t, start_layer=attention.masactrl_layer)
    elif not attention.swap:
        p2p = P2PControls(cross_replace=attention.cross_replace, self_replace=attention.self_replace,
                          reweight=attention.reweight, blend_words=blend_words(attention.blend, source, target),
                          blend_threshold=attention.blend_threshold, mask=attention.mask,
                          blocks=attention.p2p_blocks)
    return method.controls(guidance=guidance, tau=tau, p2p=p2p, masactrl=masactrl, **options)


def refine_notice(source: str, target: str, controls) -> str | None:
    """`REFINE_NOTICE` when Prompt-to-Prompt must refine (the prompts differ in word count), else None."""
    if getattr(controls, "p2p", None) is not None and not is_word_swap(source, target):
        return REFINE_NOTICE
    return None


@dataclass
class EditRun:
    """One edit request's run: the result, the inversion it decoded (cached: taken from a cache or a file, 0 UNet
    calls) and the UNet calls and seconds of each stage."""

    result: EditResult
    inversion: Inversion
    cached: bool
    nfe_invert: int
    seconds_invert: float
    seconds_edit: float

    @property
    def nfe(self) -> int:
        return self.nfe_invert + self.result.nfe

    def report(self, digits: int = 4) -> dict:
        """What both front ends report: method, control, UNet calls and seconds per stage, the resolved settings."""
        st = self.result.settings
        out = {"method": self.inversion.method, "control": st.extra["control"], "nfe": self.nfe,
               "nfe_invert": self.nfe_invert, "nfe_edit": self.result.nfe,
               "seconds_invert": round(self.seconds_invert, digits), "seconds_edit": round(self.seconds_edit, digits),
               "seconds": round(self.seconds_invert + self.seconds_edit, digits), "settings": st.as_dict()}
        if self.inversion.run is not None and not self.cached:  # a fresh inversion's own settings
            out["settings_invert"] = self.inversion.run.settings.as_dict()
        return out


def run_edit(pipe, invert: Callable[[], tuple[Inversion, bool]], target_prompts, controls, *,
             should_stop: StopFn | None = None, on_stage: Callable[[str], None] | None = None) -> EditRun:
    """`invert()` -> (inversion, cached), then `pipe.edit` to `target_prompts` under `controls`, each stage timed
    and its UNet calls counted on the pipeline's counter (shared by all its UNets). `on_stage("editing")` marks the
    switch (the web page's progress)."""
    counter = pipe.model.counter
    calls0, t0 = counter.calls, time.perf_counter()
    inversion, cached = invert()
    calls1, t1 = counter.calls, time.perf_counter()
    if on_stage is not None:
        on_stage("editing")
    result = pipe.edit(inversion, target_prompts, controls, should_stop=should_stop)
    return EditRun(result=result, inversion=inversion, cached=cached, nfe_invert=calls1 - calls0,
                   seconds_invert=t1 - t0, seconds_edit=time.perf_counter() - t1)
