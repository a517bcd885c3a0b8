"""`icd train COMPONENT --config FILE`: train one component of the embedded model from a TOML table."""

from __future__ import annotations

import importlib
import logging

from icd.cli import catalog
from icd.cli.common import start_compute

# component -> the module holding its config dataclass and the function that trains it; the order is the `choices`
# order of --help (`catalog.TRAINERS`, which --help reads without importing these: they import torch).
_TRAINERS = {
    "vae": ("icd.train.vae", "VAEConfig", "train_vae"),
    "judge": ("icd.train.judge", "JudgeConfig", "train_judge"),
    "teacher": ("icd.train.teacher", "TeacherConfig", "train_teacher"),
    "guidance": ("icd.train.guidance", "GuidanceConfig", "train_guidance"),
    "icd": ("icd.train.icd", "ICDConfig", "train_icd"),
    "ip2p": ("icd.train.ip2p", "IP2PConfig", "train_ip2p"),  # InstructPix2Pix on the teacher's P2P triples
    "flow_teacher": ("icd.train.flow_teacher", "FlowTeacherConfig", "train_flow_teacher"),  # docs/flow.md
}


def trainers() -> dict:
    """component -> (its config dataclass, the function that trains it), imported (torch)."""
    out = {}
    for name, (module, config, train) in _TRAINERS.items():
        m = importlib.import_module(module)
        out[name] = (getattr(m, config), getattr(m, train))
    return out


def __getattr__(name: str):
    if name == "TRAINERS":  # as before: the imported registry (tests, tools)
        return trainers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cmd_train(args) -> None:
    start_compute(args)
    from icd.train.config import load_config  # heavy (torch): --help and usage errors never get here
    from icd.train.runner import run_folder  # as above

    config_cls, run = trainers()[args.component]
    logging.getLogger("icd.train").setLevel(logging.INFO)  # a long run reports its batch, validation and skips
    cfg = load_config(config_cls, args.config, args.section or args.component, args.set or [])
    with run_folder(cfg.out_dir):  # writable before training; a failed start leaves no empty run folder
        result = run(cfg, resume=not args.no_resume)
    print(result)


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a component of the embedded model from a TOML config")
    t.add_argument("component", choices=catalog.TRAINERS)
    t.add_argument("--config", required=True, help="TOML file with a table named after the component")
    t.add_argument("--section", default=None,
                   help="TOML table to read (default: the component's name), e.g. an ablation row")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--no-resume", action="store_true",
                   help="ignore existing checkpoints in out_dir and start afresh (refused where out_dir holds a "
                   "finished run's final/)")
    t.set_defaults(func=cmd_train)
