"""Issue 34, command line: output paths checked before any compute (length, device nodes and other non-files), the
--save-inversion naming rule, reweight factors refused up front, a NaN named by its cause, a --unet whose config
does not match its weights. Every refusal: exit 2, one line, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from icd import world
from icd.cli import main
from icd.editing.controllers import REWEIGHT_MAX, P2PControls
from icd.imageio import ImageError, save_image
from icd.io import name_problem, output_problem, pair_paths
from icd.paths import embedded_model_path

CASE = world.make_case("color", 1)
SRC, TGT = CASE.source_prompt, CASE.target_prompt  # "… purple triangle …" -> "… blue triangle …"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def img(tmp_path) -> str:
    path = tmp_path / "img.png"
    Image.fromarray(CASE.source).save(path)
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a model: its refusal must come before any compute."""
    import icd.cli.edit
    import icd.cli.sample

    def refuse(*a, **k):
        raise AssertionError("the command loaded a model before refusing its bad option")

    for module in (icd.cli.edit, icd.cli.sample):
        monkeypatch.setattr(module, "load_pipeline", refuse)


def _refused(argv: list[str], capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("icd: error: ") and len(lines[0]) < 400, err
    return lines[0]


def _entries(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _char_device(path: Path) -> Path:
    """A character device node like /dev/null at `path` (root), else a FIFO: an existing non-regular file that a
    write by rename would replace. Never the real /dev/null: a regression would replace the machine's node."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return path


# ------------------------------------------------------------------------------------------- path checks (pure)

def test_name_and_output_problems(tmp_path):
    assert name_problem(tmp_path / "ok.png") is None
    assert "300 bytes" in name_problem(tmp_path / ("a" * 296 + ".png"))
    assert "300 bytes" in name_problem(tmp_path / ("é" * 148 + ".png"))  # bytes, not characters
    assert name_problem(tmp_path / ("a" * 235 + ".png")) is None  # 239 bytes + the temporary file's 16 fit 255
    assert "bytes long; a file name" in name_problem(tmp_path / ("a" * 236 + ".png"))
    assert "folder name" in name_problem(tmp_path / ("d" * 256) / "x.png")
    assert "a path takes at most" in name_problem(tmp_path / ("d/" * 2100 + "x.png"))
    node = _char_device(tmp_path / "node.png")
    assert "never replaced" in output_problem(node)
    os.symlink(node, tmp_path / "link.png")
    assert "never replaced" in output_problem(tmp_path / "link.png")  # judged by what the link points at
    assert "directory" in output_problem(tmp_path)
    (tmp_path / "file.png").write_bytes(b"x")
    assert output_problem(tmp_path / "file.png") is None and output_problem(tmp_path / "new.png") is None


def test_save_image_never_replaces_a_device_node(tmp_path):
    node = _char_device(tmp_path / "node.png")
    kind = stat.S_IFMT(os.lstat(node).st_mode)
    with pytest.raises(ImageError, match="not a regular file"):
        save_image(np.zeros((8, 8, 3), np.uint8), node)
    assert stat.S_IFMT(os.lstat(node).st_mode) == kind and _entries(tmp_path) == {"node.png"}


def test_pair_paths_keep_the_whole_name():
    assert pair_paths("invs/run.v1") == (Path("invs/run.v1.json"), Path("invs/run.v1.safetensors"))
    assert pair_paths("2024.05.01-cat") == (Path("2024.05.01-cat.json"), Path("2024.05.01-cat.safetensors"))
    assert pair_paths("inv") == (Path("inv.json"), Path("inv.safetensors"))
    for given in ("a/inv.json", "a/inv.safetensors"):
        assert pair_paths(given) == (Path("a/inv.json"), Path("a/inv.safetensors"))
    assert pair_paths("x.tar.gz")[0] == Path("x.tar.gz.json") and pair_paths(".json")[0] == Path(".json.json")


# ------------------------------------------------------------------------------------------- before any compute

def _commands(img: str, out: str) -> dict[str, list[str]]:
    return {"generate": ["generate", TGT, "-o", out],
            "invert": ["invert", img, "--prompt", SRC, "-o", out],
            "edit": ["edit", img, "--source", SRC, "--target", TGT, "-o", out]}


@pytest.mark.parametrize("command", ["generate", "invert", "edit"])
def test_over_long_output_names_are_refused_before_any_compute(tmp_path, img, capsys, no_model, command):
    before = _entries(tmp_path)
    for out, needle in [(str(tmp_path / ("a" * 296 + ".png")), "300 bytes long"),
                        (str(tmp_path / ("d" * 300) / "x.png"), "folder name"),
                        (str(tmp_path / ("d/" * 2100 + "x.png")), "a path takes at most")]:
        line = _refused(_commands(img, out)[command], capsys)
        assert needle in line and len(line) < 400
        line = _refused(_commands(img, out)[command] + ["--force"], capsys)
        assert needle in line
    assert _entries(tmp_path) == before


@pytest.mark.parametrize("command", ["generate", "invert", "edit"])
def test_a_device_node_is_never_an_output_even_with_force(tmp_path, img, capsys, no_model, command):
    node = _char_device(tmp_path / "null.png")
    kind = stat.S_IFMT(os.lstat(node).st_mode)
    for force in ([], ["--force"]):
        line = _refused(_commands(img, str(node))[command] + force, capsys)
        assert "not a regular file" in line and "--force" in line
    if command == "edit":
        good = str(tmp_path / "e.png")
        line = _refused(_commands(img, good)["edit"] + ["--grid", str(node), "--force"], capsys)
        assert "not a regular file" in line
        _char_device(tmp_path / "inv.json")
        line = _refused(_commands(img, good)["edit"] + ["--save-inversion", str(tmp_path / "inv"), "--force"], capsys)
        assert "--save-inversion" in line and "not a regular file" in line
        line = _refused(_commands(img, good)["edit"] + ["--save-inversion", str(tmp_path / ("i" * 250)), "--force"],
                        capsys)
        assert "--save-inversion" in line and "bytes long" in line
    assert stat.S_IFMT(os.lstat(node).st_mode) == kind
    assert _entries(tmp_path) <= {"img.png", "null.png", "inv.json"}


@pytest.mark.parametrize("factor", ["1e30", "101", "-1e6", "1e309"])
def test_a_huge_reweight_factor_is_refused_before_the_model_loads(tmp_path, img, capsys, no_model, factor):
    argv = _commands(img, str(tmp_path / "e.png"))["edit"] + ["--reweight", f"blue={factor}"]
    line = _refused(argv, capsys)
    assert "--reweight" in line and ("-100..100" in line or "finite" in line)
    assert not (tmp_path / "e.png").exists()


def test_reweight_range_is_checked_beside_the_data():
    for ok in (0.0, -5.0, REWEIGHT_MAX, -REWEIGHT_MAX):
        assert P2PControls(reweight={"blue": ok}).reweight == {"blue": ok}
    for bad in (REWEIGHT_MAX * 1.01, -1e30, 1e30):
        with pytest.raises(ValueError, match=r"reweight.*-100\.\.100"):
            P2PControls(reweight={"blue": bad})
    with pytest.raises(ValueError, match="reweight"):
        P2PControls(reweight_new_words=1e4)


# ------------------------------------------------------------------------------------------- with the embedded model

def test_save_inversion_keeps_dotted_names(tmp_path, img, capsys):
    """`--save-inversion invs/run.v1` writes invs/run.v1.json + .safetensors (not invs/run.json), and
    `--inversion invs/run.v1` reads them back; `2024.05.01-cat` keeps its name too."""
    assert "run.v1.json" in " ".join(main_help("edit").split())
    for name in ("invs/run.v1", "2024.05.01-cat"):
        out = tmp_path / f"{Path(name).name}.png"
        code = main([*_commands(img, str(out))["edit"], "--save-inversion", str(tmp_path / name), "--json"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        meta, tensors = (tmp_path / f"{name}.json"), (tmp_path / f"{name}.safetensors")
        assert meta.is_file() and tensors.is_file(), sorted(_entries(tmp_path))
        assert json.loads(captured.out)["inversion"] == str(meta)
        again = tmp_path / f"{Path(name).name}-again.png"
        code = main([*_commands(img, str(again))["edit"], "--inversion", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 0, err
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert not (tmp_path / "invs" / "run.json").exists() and not (tmp_path / "2024.json").exists()


def main_help(command: str) -> str:
    from icd.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def _unet_folder(tmp_path: Path, **config_changes) -> Path:
    src = embedded_model_path() / "unet_guidance"
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(src / "diffusion_pytorch_model.safetensors", folder)
    config = json.loads((src / "config.json").read_text()) | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_unet_whose_config_does_not_match_its_weights_is_named(tmp_path, img, capsys):
    folder = _unet_folder(tmp_path, layers_per_block=2)
    line = _refused(["invert", img, "--prompt", SRC, "--unet", str(folder), "-o", str(tmp_path / "r.png")], capsys)
    assert str(folder) in line and "config.json and its weights disagree" in line
    assert "low_cpu_mem_usage" not in line and "http" not in line
    assert not (tmp_path / "r.png").exists()


def test_a_nan_after_the_compute_names_its_cause(tmp_path, img, capsys):
    state = load_file(str(embedded_model_path() / "unet_guidance" / "diffusion_pytorch_model.safetensors"))
    state["conv_in.weight"] = torch.full_like(state["conv_in.weight"], float("inf"))
    save_file(state, str(tmp_path / "inf_unet.safetensors"))
    line = _refused(["invert", img, "--prompt", SRC, "--unet", str(tmp_path / "inf_unet.safetensors"), "-o",
                     str(tmp_path / "r.png")], capsys)
    assert "NaN/Inf latents" in line and "the unet's weights hold NaN/Inf" in line and "conv_in.weight" in line
    assert not (tmp_path / "r.png").exists()
