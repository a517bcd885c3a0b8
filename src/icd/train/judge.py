"""Train the judge (`icd.judge`) on degraded world renders with up to three objects."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from icd import judge as J
from icd import world
from icd.imageio import to_tensor
from icd.runtime import step_generator
from icd.train.config import ConfigError, RunConfig
from icd.train.data import CACHE, world_dataset
from icd.train.runner import TrainingRun, check_run, lr_at, set_lr

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeConfig(RunConfig):
    out_dir: str = "runs/judge"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3  # AdamW, cosine decay to lr_min
    lr_min: float = 1e-5
    weight_decay: float = 1e-4
    n_images: int = 40000  # renders with 1-3 objects, seeds 500_000_000 + i (disjoint from teacher data)
    clean_fraction: float = 0.25  # share of each batch left undegraded
    n_eval: int = 2000  # held-out renders for the final accuracy report
    checkpoint_every: int = 500
    log_every: int = 50

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ConfigError(f"JudgeConfig.clean_fraction must be in [0, 1], got {self.clean_fraction}")


SEED_START = 500_000_000


@torch.no_grad()
def evaluate(model: J.Judge, n: int, *, degraded: bool, seed: int = 0) -> dict:
    images, captions = world_dataset(n, seed_start=world.EVAL_SEED_START, max_objects=3)
    x = to_tensor(images)
    if degraded:
        x = J.degrade(x, step_generator(seed, -1, stream=7))
    scorer = J.JudgeScorer(model)
    return J.attribute_accuracy(scorer.read(x), [world.parse_caption(c) for c in captions])


def train_judge(cfg: JudgeConfig, *, resume: bool = True) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_run(cfg, resume=resume)  # before any model loads or any file changes
    out = Path(cfg.out_dir)
    images, captions = world_dataset(cfg.n_images, seed_start=SEED_START, max_objects=3, cache_dir=out / CACHE)
    attrs = [world.parse_caption(c) for c in captions]
    torch.manual_seed(cfg.seed)
    model = J.Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = TrainingRun(out, desc="train judge", total_steps=cfg.steps,
                      columns=["loss", "objects", "background", "count", "lr"], modules={"judge": model},
                      optimizers={"judge": opt}, config=cfg, log_every=cfg.log_every,
                      checkpoint_every=cfg.checkpoint_every, resume=resume)
    with run:
        while not run.done:
            model.train()
            gen = step_generator(cfg.seed, run.step)
            idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
            x = to_tensor(images[idx.numpy()])
            n_clean = int(round(cfg.clean_fraction * cfg.batch_size))
            strength = torch.rand(1, generator=gen).item() * 0.5 + 0.75
            x[n_clean:] = J.degrade(x[n_clean:], gen, strength)
            tgt = J.targets([attrs[i] for i in idx.tolist()])
            lr = set_lr([opt], lr_at(run.step, cfg))
            losses = J.judge_loss(model(x), tgt)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            run.end_step({**{k: v.item() for k, v in losses.items()}, "lr": lr})
    model.eval()
    report = {"clean": evaluate(model, cfg.n_eval, degraded=False),
              "degraded": evaluate(model, cfg.n_eval, degraded=True)}
    tmp = out / "judge.safetensors.tmp"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / "judge.safetensors")
    log.info("judge accuracy: %s", report)
    return report
