"""`icd train COMPONENT --config FILE`: train one component of the embedded model from a TOML table."""

from __future__ import annotations

import logging

from icd.train.config import load_config
from icd.train.guidance import GuidanceConfig, train_guidance
from icd.train.icd import ICDConfig, train_icd
from icd.train.ip2p import IP2PConfig, train_ip2p
from icd.train.judge import JudgeConfig, train_judge
from icd.train.runner import run_folder
from icd.train.teacher import TeacherConfig, train_teacher
from icd.train.vae import VAEConfig, train_vae

# component -> (its config dataclass, the function that trains it); the order is the `choices` order of --help.
TRAINERS = {
    "vae": (VAEConfig, train_vae),
    "judge": (JudgeConfig, train_judge),
    "teacher": (TeacherConfig, train_teacher),
    "guidance": (GuidanceConfig, train_guidance),
    "icd": (ICDConfig, train_icd),
    "ip2p": (IP2PConfig, train_ip2p),  # InstructPix2Pix on the teacher's P2P triples (docs/experiments/ip2p.md)
}


def cmd_train(args) -> None:
    config_cls, run = TRAINERS[args.component]
    logging.getLogger("icd.train").setLevel(logging.INFO)  # a long run reports its batch, validation and skips
    cfg = load_config(config_cls, args.config, args.section or args.component, args.set or [])
    with run_folder(cfg.out_dir):  # writable before training; a failed start leaves no empty run folder
        result = run(cfg, resume=not args.no_resume)
    print(result)


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a component of the embedded model from a TOML config")
    t.add_argument("component", choices=list(TRAINERS))
    t.add_argument("--config", required=True, help="TOML file with a table named after the component")
    t.add_argument("--section", default=None,
                   help="TOML table to read (default: the component's name), e.g. an ablation row")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    t.add_argument("--no-resume", action="store_true",
                   help="ignore existing checkpoints in out_dir and start afresh (refused where out_dir holds a "
                   "finished run's final/)")
    t.set_defaults(func=cmd_train)
