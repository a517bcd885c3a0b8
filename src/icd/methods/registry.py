"""The method registry and its menu entries, light to import (no torch): the command line's menus, `--help` and the
checks before the model read an `Entry`; the pipeline, the bench and the web engine get the method object, whose
module (and torch) is imported on first use.

An `Entry` is a built-in method's menu (name, summary, tasks, the controls it takes) and where its class lives; the
class takes those attributes from its entry when it is defined (`icd.methods.base.Method.__init_subclass__`), so
each fact is written once, in `icd.methods.BUILTIN`. A `Method` object (a test's, a plug-in's) registers as it is.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

MODEL_KINDS = ("vp", "flow")  # epsilon-prediction (VP) models and rectified-flow models (`LatentDiffusion.kind`)
TASKS = ("invert", "reconstruct", "edit", "generate")  # what a method may serve (reconstruct: invert + decode as a
# round trip; edit: invert + decode source and targets; generate: from noise)


@dataclass(frozen=True)
class Entry:
    """A built-in method's menu and its class (``"module:Class"``), imported on first use."""

    name: str
    target: str  # "icd.methods.icd:ICD"
    summary: str
    tasks: tuple[str, ...] = TASKS
    attention_control: bool = True  # takes Prompt-to-Prompt, MasaCtrl or a prompt swap
    takes_tau: bool = True  # takes a dynamic-CFG threshold
    takes_strength: bool = False  # takes SDEdit's strength S
    options: tuple[str, ...] = ()  # its own request fields (e.g. IP2P's instruction, image_guidance)
    weights: str | None = None  # the option naming weights of its own (IP2P: ``ip2p``, `--ip2p DIR`)
    models: tuple[str, ...] = MODEL_KINDS  # the model kinds it runs on (`LatentDiffusion.kind`: vp, flow)

    def menu(self) -> dict[str, Any]:
        """The attributes a method class takes from its entry."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "target"}

    def load(self) -> Any:
        """The method object: its module imported, its class instantiated."""
        module, _, qualname = self.target.partition(":")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        method = cls()
        if method.name != self.name:
            raise TypeError(f"{self.target} names itself {method.name!r}, its entry {self.name!r}")
        return method


MENU = tuple(k for k in Entry.__dataclass_fields__ if k != "target")  # the attributes an entry gives its class
_ENTRIES: dict[str, Entry] = {}  # every entry ever registered, by target: what a class being defined looks up


def entry_of(cls: type) -> Entry | None:
    """The registered entry whose target is `cls` (None: a class of no entry: a shared base, a test's method)."""
    return _ENTRIES.get(f"{cls.__module__}:{cls.__qualname__}")


class Registry:
    """The methods by name, in the order they were registered (the order every menu lists them in). Each is an
    `Entry` until first asked for its object (`get`, `methods`, iteration), a method object from then on."""

    def __init__(self, methods: Sequence[Any] = ()):
        self._methods: dict[str, Any] = {}
        for m in methods:
            self.register(m)

    def register(self, method):
        """Add `method` (an `Entry` or an `icd.methods.Method`); ValueError for a name already taken or a malformed
        one, TypeError for anything else."""
        base = sys.modules.get("icd.methods.base")  # not imported yet: no method object exists
        if not isinstance(method, Entry) and (base is None or not isinstance(method, base.Method)):
            raise TypeError(f"a method must be an icd.methods.Method, got {type(method).__name__}")
        if not method.name or method.name[-1].isdigit() or any(c in method.name for c in ":@, "):
            raise ValueError(f"method name {method.name!r} must be non-empty, not end in a digit (bench names add a "
                             "step count) and hold no ':', '@', ',' or space")
        if not method.models or any(k not in MODEL_KINDS for k in method.models):
            raise ValueError(f"method {method.name!r}: models must be some of {', '.join(MODEL_KINDS)}")
        bad = [t for t in method.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"method {method.name!r}: unknown task(s) {', '.join(bad)}; choose from "
                             f"{', '.join(TASKS)}")
        if method.name in self._methods:
            raise ValueError(f"method {method.name!r} is already registered")
        if isinstance(method, Entry):
            _ENTRIES.setdefault(method.target, method)
        self._methods[method.name] = method
        return method

    def unregister(self, name: str) -> None:
        self._methods.pop(name)

    @contextmanager
    def registered(self, method) -> Iterator[Any]:
        """`method` registered for the block, then removed (tests, plug-ins)."""
        self.register(method)
        try:
            yield method
        finally:
            self.unregister(method.name)

    # ------------------------------------------------------------------ the menu: no method module imported
    def menu(self, task: str | None = None) -> list:
        """The methods serving `task` (all: None) as their menus: entries or method objects, both with `MENU`'s
        attributes."""
        return [m for m in self._methods.values() if task is None or task in m.tasks]

    def names(self, task: str | None = None, *, strength: bool | None = None, option: str | None = None,
              attention_control: bool | None = None, model: str | None = None) -> list[str]:
        """Names of the methods serving `task` (all: None), optionally only those that take a strength, an
        option or attention control, or run on a model kind (`MODEL_KINDS`)."""
        return [m.name for m in self.menu(task) if (strength is None or m.takes_strength == strength)
                and (option is None or option in m.options)
                and (attention_control is None or m.attention_control == attention_control)
                and (model is None or model in m.models)]

    def lookup(self, name: str, task: str | None = None):
        """The menu of method `name` (serving `task`); ValueError listing the valid names otherwise."""
        method = self._methods.get(name)
        if method is None or (task is not None and task not in method.tasks):
            what = f" for {task}" if task else ""
            raise ValueError(f"unknown method {name!r}{what}; choose from {', '.join(self.names(task))}")
        return method

    # ------------------------------------------------------------------ the objects: imported on first use
    def _load(self, name: str):
        method = self._methods[name]
        if isinstance(method, Entry):
            method = self._methods[name] = method.load()
        return method

    def get(self, name: str, task: str | None = None):
        """The method object `name` (serving `task`); ValueError listing the valid names otherwise."""
        return self._load(self.lookup(name, task).name)

    def methods(self, task: str | None = None) -> list:
        return [self._load(m.name) for m in self.menu(task)]

    def __contains__(self, name: str) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Any]:
        return iter(self.methods())


REGISTRY = Registry()  # filled with `icd.methods.BUILTIN` when `icd.methods` is imported
