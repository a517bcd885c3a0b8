"""The one training scaffold (`icd.train.scaffold`): a toy trainer that supplies only its model, loss and data gets
resume, check_run, accumulation, the EMA, validation and one-process refusal from `run_training`; IP2P gains
processes and precision through it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch

from icd.runtime import step_generator
from icd.train.config import ConfigError, RunConfig, ScaleConfig
from icd.train.scaffold import EMA, Parts, Trainer, Update, run_training


@dataclass(frozen=True)
class ToyConfig(ScaleConfig, RunConfig):
    out_dir: str = "runs/toy"
    width: int = 3
    ema_decay: float = 0.0
    steps: int = 4
    batch_size: int = 4
    lr: float = 0.05
    checkpoint_every: int = 1
    log_every: int = 1
    device: str = "cpu"


@dataclass(frozen=True)
class OneProcessConfig(RunConfig):  # no device field: one CPU process
    out_dir: str = "runs/one"
    steps: int = 2
    batch_size: int = 4


class Toy(Trainer):
    """Least squares on fixed data: the whole of what a trainer supplies."""

    name, columns = "toy", ("loss", "lr")
    loads: list = []  # every call of load(), across instances
    validated: list = []

    def load(self):
        Toy.loads.append(self.cfg.out_dir)
        gen = torch.Generator().manual_seed(0)
        width = getattr(self.cfg, "width", 3)
        self.x = torch.randn(32, width, generator=gen)
        self.y = self.x @ torch.arange(1.0, width + 1)[:, None]

    def build(self):
        self.model = torch.nn.Linear(self.x.shape[1], 1)
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr)
        decay = getattr(self.cfg, "ema_decay", 0.0)
        return Parts({"toy": self.model}, [Update("toy", opt, list(self.model.parameters()))],
                     EMA(decay, {"ema_toy": self.model}) if decay else None)

    def batch(self, step, rows):
        idx = torch.randint(len(self.x), (self.cfg.batch_size,), generator=step_generator(self.cfg.seed, step))[rows]
        return {"x": self.x[idx], "y": self.y[idx]}

    def loss(self, batch):
        return {"loss": ((self.model(batch["x"]) - batch["y"]) ** 2).mean()}

    def validator(self):
        return lambda step: Toy.validated.append(step)

    def export(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _toy(tmp_path, out="toy", **kw) -> ToyConfig:
    return ToyConfig(out_dir=str(tmp_path / out), **kw)


def _train(cfg, resume=True):
    return run_training(Toy(cfg), resume=resume)


def test_ema_warm_up_rule_and_update():
    ema = EMA(0.999, {"m": torch.nn.Linear(2, 1)})
    assert [round(ema.decay_at(s), 6) for s in (0, 8, 10**6)] == [0.1, 0.5, 0.999]
    live = torch.nn.Linear(2, 1)
    ema = EMA(0.9, {"ema": live, "params": {"a": [live.weight]}})
    start = live.weight.detach().clone()
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(0)  # decay 0.1: 90 % of the way to the weights
    for average in (ema.modules["ema"].weight, ema.modules["params"]["a"][0]):
        torch.testing.assert_close(average, start + 0.9, rtol=0, atol=1e-6)
    ema.copy_to()
    torch.testing.assert_close(live.weight.detach(), start + 0.9, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decay"):
        EMA(1.0, {"m": live})


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_an_interrupted_toy_run_resumes_to_identical_weights(tmp_path, monkeypatch, ema_decay):
    from conftest import run_interrupted  # the shared helper of the training tests

    straight = _train(_toy(tmp_path, "a", ema_decay=ema_decay))
    resumed = {}
    run_interrupted(lambda cfg: resumed.update(_train(cfg)), _toy(tmp_path, "b", ema_decay=ema_decay), after=2,
                    monkeypatch=monkeypatch)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert (tmp_path / "b" / "run.json").is_file()
    if ema_decay:  # the result is the average, which differs from the last weights
        from safetensors.torch import load_file

        last = load_file(str(tmp_path / "a" / "step-000004" / "model.toy.safetensors"))
        assert not torch.equal(last["weight"], straight["weight"])


def test_the_scaffold_checks_the_run_before_the_trainer_loads(tmp_path):
    _train(_toy(tmp_path, steps=1))
    Toy.loads.clear()
    with pytest.raises(ConfigError, match="width=3; this config says 5"):
        _train(_toy(tmp_path, steps=2, width=5))
    with pytest.raises(ConfigError, match="device"):
        _train(_toy(tmp_path, "other", device="nope"))
    assert Toy.loads == []


def test_gradient_accumulation_gives_the_same_update(tmp_path):
    one = _train(_toy(tmp_path, "one"))
    two = _train(_toy(tmp_path, "two", gradient_accumulation=2))
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="gradient_accumulation 8 exceeds"):
        _train(_toy(tmp_path, "three", gradient_accumulation=8))


@pytest.mark.parametrize(("steps", "ema_decay", "expected"),
                         [(5, 0.0, [2, 4, 5]), (4, 0.0, [2, 4]), (4, 0.9, [2, 4, 4])])
def test_validation_runs_on_its_cadence_and_on_the_exported_weights(tmp_path, steps, ema_decay, expected):
    Toy.validated.clear()
    _train(_toy(tmp_path, steps=steps, ema_decay=ema_decay, validate_every=2))
    assert Toy.validated == expected


def test_a_config_without_a_device_refuses_several_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    Toy.loads.clear()
    with pytest.raises(ConfigError, match="OneProcessConfig trains in one process"):
        _train(OneProcessConfig(out_dir=str(tmp_path / "one")))
    assert Toy.loads == []
    monkeypatch.delenv("WORLD_SIZE")
    assert set(_train(OneProcessConfig(out_dir=str(tmp_path / "one")))) == {"weight", "bias"}


def test_ip2p_gains_a_device_and_mixed_precision(tmp_path, caplog):
    from icd.train.ip2p import IP2PConfig, train_ip2p

    def cfg(out, **kw):
        return IP2PConfig(out_dir=str(tmp_path / out), triples_dir=str(tmp_path / "triples"), n_chunks=1, chunk=2,
                          teacher_steps=4, steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1,
                          validation_cases=0, **{"device": "cpu", **kw})

    with pytest.raises(ConfigError, match="IP2PConfig.device"):
        train_ip2p(cfg("bad", device="nope"))
    assert not (tmp_path / "triples").exists()  # refused before the teacher loaded or any triple was made
    with caplog.at_level(logging.INFO, logger="icd.train.scaffold"):
        train_ip2p(cfg("bf16", mixed_precision="bf16", gradient_accumulation=2))
    assert "2 accumulation x 1 process(es) on cpu, bf16 precision" in caplog.text
    train_ip2p(cfg("fp32"))
    from safetensors.torch import load_file

    name = "step-000002/model.unet.safetensors"
    a, b = load_file(str(tmp_path / "bf16" / name)), load_file(str(tmp_path / "fp32" / name))
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)  # autocast changed the arithmetic


def test_an_ema_decay_outside_0_1_is_refused_in_the_config():
    from icd.train.ip2p import IP2PConfig
    from icd.train.teacher import TeacherConfig

    for cls in (TeacherConfig, IP2PConfig):
        with pytest.raises(ConfigError, match=f"{cls.__name__}.ema_decay must lie in"):
            cls(ema_decay=1.0)
