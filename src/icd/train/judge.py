"""Train the judge (`icd.judge`) on degraded world renders with up to three objects."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from icd import judge as J
from icd import world
from icd.imageio import to_tensor
from icd.runtime import step_generator
from icd.train.config import ConfigError, RunConfig
from icd.train.data import CACHE, world_dataset
from icd.train.scaffold import Parts, Trainer, Update, run_training

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


class JudgeTrainer(Trainer):
    name, columns = "judge", ("loss", "objects", "background", "count", "lr")

    def load(self) -> None:
        self.images, captions = world_dataset(self.cfg.n_images, seed_start=SEED_START, max_objects=3,
                                              cache_dir=self.out / CACHE)
        self.attrs = [world.parse_caption(c) for c in captions]

    def build(self) -> Parts:
        self.model = J.Judge().train()
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return Parts({"judge": self.model}, [Update("judge", opt, list(self.model.parameters()), max_norm=None)])

    def batch(self, step: int, rows: torch.Tensor) -> dict:  # one process: every row
        cfg = self.cfg
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(len(self.images), (cfg.batch_size,), generator=gen)
        x = to_tensor(self.images[idx.numpy()])
        n_clean = int(round(cfg.clean_fraction * cfg.batch_size))
        strength = torch.rand(1, generator=gen).item() * 0.5 + 0.75
        x[n_clean:] = J.degrade(x[n_clean:], gen, strength)
        return {"x": x, "targets": J.targets([self.attrs[i] for i in idx.tolist()])}

    def loss(self, batch: dict) -> dict[str, torch.Tensor]:
        return J.judge_loss(self.model(batch["x"]), batch["targets"])

    def export(self) -> dict:
        self.model.eval()
        report = {"clean": evaluate(self.model, self.cfg.n_eval, degraded=False),
                  "degraded": evaluate(self.model, self.cfg.n_eval, degraded=True)}
        tmp = self.out / "judge.safetensors.tmp"
        save_file({k: v.half().contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        tmp.replace(self.out / "judge.safetensors")
        log.info("judge accuracy: %s", report)
        return report


def train_judge(cfg: JudgeConfig, *, resume: bool = True) -> dict:
    return run_training(JudgeTrainer(cfg), resume=resume)
