import json
from pathlib import Path

import pytest
import tomllib
import torch

from icd.cli.train import TRAINERS
from icd.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from icd.train.config import ConfigError, load_config
from icd.train.icd import ICDConfig
from icd.train.runner import set_lr
from icd.train.teacher import TeacherConfig
from icd.train.vae import VAEConfig


def test_config_loads_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[vae]\nsteps = 10\nlr = 1\n')
    cfg = load_config(VAEConfig, path, "vae", ["batch_size=4", "out_dir=runs/x"])
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.out_dir) == (10, 1.0, 4, "runs/x")


@pytest.mark.parametrize("text, needle", [("[vae]\nstepz = 3\n", "stepz"), ("[vae]\nsteps = 'many'\n", "steps"),
                                          ("[other]\n", "[vae]"), ("[vae\n", "invalid TOML")])
def test_config_errors_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(VAEConfig, path, "vae")


def test_config_validation_in_post_init():
    with pytest.raises(ValueError, match="caption_dropout"):
        TeacherConfig(caption_dropout=1.5)


ROOT = Path(__file__).resolve().parents[1]
# the shipped configs, and the rows of each study beside its write-up (docs/experiments/<study>.toml)
CONFIG_FILES = sorted(ROOT.glob("configs/*.toml")) + sorted(ROOT.glob("docs/experiments/*.toml"))
# a section named after a trainer (`icd train NAME` reads [NAME] by default), or NAME_<variant> (`--section`, e.g.
# flow_teacher_16), builds that trainer's config; every other section (ablation and study rows) is an ICDConfig
COMPONENTS = {name: cls for name, (cls, _) in TRAINERS.items()}


def section_class(section: str):
    """The config class of a section: its trainer's (longest matching trainer name), else ICDConfig."""
    names = [n for n in COMPONENTS if section == n or section.startswith(n + "_")]
    return COMPONENTS[max(names, key=len)] if names else ICDConfig


def test_the_config_files_are_found():
    assert {"embedded.toml", "icd-ablation.toml", "icd-gpu.toml"} <= {p.name for p in CONFIG_FILES}
    assert any(p.parent.name == "experiments" for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_shipped_config_section_builds_its_typed_config(path):
    """A typo in an ablation row fails here, not an hour into a training run (icd-*.toml and study rows are
    ICDConfig)."""
    sections = tomllib.loads(path.read_text())
    assert sections
    for section in sections:
        cls = section_class(section)
        config = load_config(cls, path, section)
        assert isinstance(config, cls), section


def test_row_names_are_unique_across_config_files():
    """`benchmarks/study.sh train ROW` finds a row's file by its section name alone, among its ROW_FILES (the
    recipe files -- embedded.toml, sd15_icd.toml, sdxl_icd.toml -- name their tables after the components)."""
    seen: dict[str, str] = {}
    row_files = [ROOT / "configs" / "icd-ablation.toml", ROOT / "configs" / "icd-gpu.toml",
                 *sorted(ROOT.glob("docs/experiments/*.toml"))]
    assert "ROW_FILES=(configs/icd-ablation.toml configs/icd-gpu.toml docs/experiments/*.toml)" in (
        ROOT / "benchmarks" / "study.sh").read_text()  # the files study.sh searches
    for path in row_files:
        for section in tomllib.loads(path.read_text()):
            assert section not in seen, f"[{section}] is in both {seen[section]} and {path.name}"
            seen[section] = path.name


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, modules={"m": model}, optimizers={"o": opt}, extra={"note": "x"})
    model2, opt2 = torch.nn.Linear(4, 3), None
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    state = load_checkpoint(latest_checkpoint(tmp_path), modules={"m": model2}, optimizers={"o": opt2})
    assert state["step"] == 1 and state["extra"] == {"note": "x"}
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        for name in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][name]), torch.as_tensor(s2[k][name]))
    files = sorted(p.name for p in (tmp_path / "step-000001").iterdir())
    assert files == ["model.m.safetensors", "optim.o.safetensors", "state.json"]
    json.loads((tmp_path / "step-000001" / "state.json").read_text())


def test_set_lr_scales_groups_that_ask_and_the_scale_survives_a_checkpoint(tmp_path):
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    groups = [{"params": a.parameters()}, {"params": b.parameters(), "lr_scale": 10.0}]
    opt = torch.optim.AdamW(groups, lr=1.0)
    set_lr([opt], 1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, pytest.approx(1e-3)]
    save_checkpoint(tmp_path, 1, modules={"a": a, "b": b}, optimizers={"o": opt})
    opt2 = torch.optim.AdamW([{"params": a.parameters()}, {"params": b.parameters(), "lr_scale": 10.0}], lr=1.0)
    load_checkpoint(latest_checkpoint(tmp_path), modules={"a": a, "b": b}, optimizers={"o": opt2})
    set_lr([opt2], 2e-4)
    assert [g["lr"] for g in opt2.param_groups] == [2e-4, pytest.approx(2e-3)]


def test_checkpoints_keep_the_newest_and_leave_no_temporaries(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, modules={"m": model}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert latest_checkpoint(tmp_path).name == "step-000003"
