import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from icd.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_world_case_writes_the_four_files(tmp_path, capsys):
    code, out, _ = run(["world", "case", "--kind", "shape", "--seed", "4", "--out", str(tmp_path / "c")], capsys)
    assert code == 0
    meta = json.loads((tmp_path / "c" / "case.json").read_text())
    assert set(meta) >= {"source_prompt", "target_prompt", "blend_words", "kind", "seed"}
    mask = np.asarray(Image.open(tmp_path / "c" / "mask.png"))
    src, tgt = (np.asarray(Image.open(tmp_path / "c" / n)) for n in ("source.png", "target.png"))
    np.testing.assert_array_equal(mask > 0, np.any(src != tgt, axis=-1))
    code, _, err = run(["world", "case", "--kind", "shape", "--seed", "4", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--force" in err


def test_world_grid(tmp_path, capsys):
    code, _, _ = run(["world", "grid", "--n", "4", "-o", str(tmp_path / "g.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "g.png").size[0] > 0


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icd: error:"), err
    assert needle in lines[0]


def test_invert_bad_inputs(tmp_path, capsys, random_model_dir):
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    prompt = "a large red circle on a gray background"
    base = ["--model", str(random_model_dir), "--method", "ddim", "--prompt", prompt, "-o", str(tmp_path / "r.png")]
    code, _, err = run(["invert", str(tmp_path / "missing.png"), *base], capsys)
    _assert_one_line_error(code, err, "not found")
    code, _, err = run(["invert", str(tmp_path / "corrupt.png"), *base], capsys)
    _assert_one_line_error(code, err, "cannot read image")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    bad = ["--model", str(random_model_dir), "--method", "ddim", "--prompt", "a large red zebra on a gray background",
           "-o", str(tmp_path / "r.png")]
    code, _, err = run(["invert", str(tmp_path / "ok.png"), *bad], capsys)
    _assert_one_line_error(code, err, "zebra")
    code, _, err = run(["invert", str(tmp_path / "ok.png"), "--model", str(tmp_path / "nomodel"), "--prompt", prompt,
                        "-o", str(tmp_path / "r.png")], capsys)
    _assert_one_line_error(code, err, "model folder not found")
    code, _, err = run(["invert", str(tmp_path / "ok.png"), "--model", str(random_model_dir), "--prompt", prompt,
                        "-o", str(tmp_path / "ok.png"), "--force"], capsys)
    _assert_one_line_error(code, err, "overwrite the input")
    code, _, err = run(["invert", str(tmp_path / "ok.png"), "--model", str(random_model_dir), "--prompt", prompt,
                        "-o", str(tmp_path / "r.png")], capsys)
    _assert_one_line_error(code, err, "no iCD adapters")


def test_generate_unknown_word_and_empty_prompt(tmp_path, capsys, random_model_dir):
    code, _, err = run(["generate", "a large red circel on a gray background", "--model", str(random_model_dir),
                        "--method", "ddim", "-o", str(tmp_path / "g.png")], capsys)
    _assert_one_line_error(code, err, "circle")  # suggests the closest known word
    code, _, err = run(["generate", "   ", "--model", str(random_model_dir), "-o", str(tmp_path / "g.png")], capsys)
    _assert_one_line_error(code, err, "empty")


def test_invert_json_reports_counted_nfe(tmp_path, capsys, random_model_dir):
    from icd import world

    Image.fromarray(world.render(world.sample_scene(3))).save(tmp_path / "in.png")
    code, out, _ = run(["invert", str(tmp_path / "in.png"), "--prompt", world.sample_scene(3).caption, "--steps", "5",
                        "--method", "ddim", "--model", str(random_model_dir), "-o", str(tmp_path / "r.png"), "--json"],
                       capsys)
    assert code == 0
    report = json.loads(out)
    assert report["nfe"] == 10 and report["method"] == "ddim"
    assert np.isfinite(report["psnr"]) and report["seconds"] > 0
    assert (tmp_path / "r.png").is_file()


def test_icd_invert_and_generate_default_to_four_steps(tmp_path, capsys, random_icd_dir):
    from icd import world

    scene = world.sample_scene(5)
    Image.fromarray(world.render(scene)).save(tmp_path / "in.png")
    args = ["invert", str(tmp_path / "in.png"), "--prompt", scene.caption, "--model", str(random_icd_dir), "--json"]
    code, out, _ = run([*args, "-o", str(tmp_path / "r.png")], capsys)
    report = json.loads(out)
    assert code == 0 and report["method"] == "icd" and report["nfe"] == 8 and report["steps"] == 4
    code, out, _ = run([*args, "-o", str(tmp_path / "r2.png")], capsys)
    first, second = (np.asarray(Image.open(tmp_path / n)) for n in ("r.png", "r2.png"))
    np.testing.assert_array_equal(first, second)  # deterministic: the encoding noise has a fixed seed
    code, _, err = run([*args, "--steps", "3", "-o", str(tmp_path / "r3.png")], capsys)
    _assert_one_line_error(code, err, "take 4 steps")
    code, out, _ = run(["generate", scene.caption, "--model", str(random_icd_dir), "--n", "2", "--json",
                        "-o", str(tmp_path / "g.png")], capsys)
    report = json.loads(out)
    assert code == 0 and report["method"] == "icd" and report["nfe"] == 4 and report["steps"] == 4
    assert report["renoise"] == 1.0  # multistep consistency sampling by default (experiments/renoised-generation.md)
    code, out, _ = run(["generate", scene.caption, "--model", str(random_icd_dir), "--renoise", "0", "--json",
                        "-o", str(tmp_path / "g0.png")], capsys)
    assert code == 0 and json.loads(out)["renoise"] == 0.0 and json.loads(out)["nfe"] == 4
    code, _, err = run(["generate", scene.caption, "--model", str(random_icd_dir), "--renoise", "2",
                        "-o", str(tmp_path / "g2.png")], capsys)
    _assert_one_line_error(code, err, "--renoise")
    assert not (tmp_path / "g2.png").exists()


def test_console_script_help_and_bad_subcommand():
    res = subprocess.run([sys.executable, "-m", "icd.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "examples" in res.stdout
    res = subprocess.run([sys.executable, "-m", "icd.cli", "frobnicate"], capture_output=True, text=True)
    assert res.returncode == 2


@pytest.mark.parametrize("bad", [["train", "vae", "--config", "nope.toml"], ["world", "case", "--kind", "size"],
                                 ["generate", "a red star", "--threads", "1000000", "-o", "x.png"],
                                 ["demo", "--threads", "-1"]])
def test_usage_errors_exit_2(bad, capsys):
    try:
        code = main(bad)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    assert code == 2


def test_edit_cli_writes_the_edit_and_reports_counted_nfe(tmp_path, capsys, random_icd_dir):
    from icd import world

    case = world.make_case("color", world.EVAL_SEED_START + 3)
    Image.fromarray(case.source).save(tmp_path / "src.png")
    old, new = case.blend_words
    base = ["edit", str(tmp_path / "src.png"), "--source", case.source_prompt, "--target", case.target_prompt,
            "--model", str(random_icd_dir), "--json"]
    code, out, _ = run([*base, "--blend", old, new, "--reweight", f"{new}=2", "-o", str(tmp_path / "e.png"),
                        "--grid", str(tmp_path / "g.png"), "--save-inversion", str(tmp_path / "inv")], capsys)
    report = json.loads(out)
    assert code == 0 and report["method"] == "icd" and report["nfe"] == 8 and report["nfe_edit"] == 4
    assert {"seconds_invert", "seconds_edit", "seconds"} <= set(report)
    assert (tmp_path / "e.png").is_file() and (tmp_path / "g.png").is_file()
    code, out, _ = run([*base, "--blend", old, new, "--reweight", f"{new}=2", "--inversion", str(tmp_path / "inv"),
                        "-o", str(tmp_path / "e2.png")], capsys)
    assert code == 0 and json.loads(out)["nfe"] == 4  # a saved inversion costs only the reverse steps
    first, second = (np.asarray(Image.open(tmp_path / n)) for n in ("e.png", "e2.png"))
    np.testing.assert_array_equal(first, second)
    code, _, err = run([*base, "-o", str(tmp_path / "e.png")], capsys)
    _assert_one_line_error(code, err, "--force")
    code, _, err = run([*base, "--blend", "zebra", "-o", str(tmp_path / "e3.png")], capsys)
    _assert_one_line_error(code, err, "zebra")
    code, _, err = run([*base, "--reweight", "red", "-o", str(tmp_path / "e3.png")], capsys)
    _assert_one_line_error(code, err, "WORD=FACTOR")
    code, out, err = run(["edit", str(tmp_path / "src.png"), "--source", case.source_prompt, "--target",
                          "a large " + case.target_prompt.removeprefix("a "), "--model", str(random_icd_dir),
                          "--method", "ddim", "--steps", "3", "-o", str(tmp_path / "e4.png"), "--json"], capsys)
    assert code == 0 and "refine" in err and json.loads(out)["nfe"] == 6


def test_cli_layout_stays_small():
    """Architecture issue: build_parser is a loop over the command modules; no CLI module grows past 450 lines."""
    import inspect
    from pathlib import Path

    import icd.cli
    from icd.cli import build_parser

    assert len(inspect.getsource(build_parser).splitlines()) < 60
    modules = sorted(Path(icd.cli.__file__).parent.glob("*.py"))
    assert {m.stem for m in modules} >= {"__init__", "__main__", "common", "world", "train", "sample", "edit",
                                         "bench", "demo"}
    for path in modules:
        assert len(path.read_text().splitlines()) < 450, path
    for module in icd.cli.COMMANDS:
        assert callable(module.add_parser), module


def test_train_components_come_from_the_registry():
    from icd.cli.train import TRAINERS
    from icd.train.icd import ICDConfig, train_icd
    from icd.train.vae import VAEConfig, train_vae

    assert list(TRAINERS) == ["vae", "judge", "teacher", "guidance", "icd", "ip2p", "flow_teacher"]
    assert TRAINERS["icd"] == (ICDConfig, train_icd) and TRAINERS["vae"] == (VAEConfig, train_vae)
    with pytest.raises(SystemExit):
        main(["train", "unet", "--config", "x.toml"])


def test_option_defaults_follow_the_dataclasses():
    from icd.bench import BenchOptions
    from icd.cli import build_parser
    from icd.editing.controllers import MasaCtrlControls, P2PControls

    edit = build_parser().parse_args(["edit", "x.png", "--source", "a", "--target", "b", "-o", "y.png"])
    p2p, masa = P2PControls(), MasaCtrlControls()
    assert (edit.cross_replace, edit.self_replace, edit.blend_threshold) == (p2p.cross_replace, p2p.self_replace,
                                                                             p2p.blend_threshold)
    assert (edit.masactrl_start_t, edit.masactrl_layer) == (masa.start_t, masa.start_layer)
    bench = build_parser().parse_args(["bench", "editing", "--out", "o"])
    opts = BenchOptions(task="editing", out="o")
    for name in ("n", "batch", "n_timing", "examples", "device", "model", "methods", "seed_start", "guidance", "tau"):
        assert getattr(bench, name) == getattr(opts, name), name


def test_threads_are_applied_once_by_main_and_restored_after(monkeypatch, capsys, tmp_path):
    """--threads takes effect once, where the command starts computing (`common.start_compute`: a usage error never
    touches torch), and the caller's thread count comes back after (a fuzzed --threads 700 once left every later
    test of the process oversubscribed)."""
    from icd import runtime

    before = torch.get_num_threads()
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    code, _, err = run(["generate", "   ", "--threads", "3", "-o", "x.png"], capsys)
    _assert_one_line_error(code, err, "empty")  # fails before any model loads: torch's threads untouched
    assert calls == [] and torch.get_num_threads() == before
    missing = ["--model", str(tmp_path / "no-model"), "-o", str(tmp_path / "x.png")]
    code, _, err = run(["generate", "a red circle", "--threads", "3", *missing], capsys)
    assert code == 2 and err.startswith("icd: error:")  # the model load failed after --threads took effect
    assert calls == [3, before] and torch.get_num_threads() == before
    calls.clear()
    monkeypatch.setattr(runtime, "default_threads", lambda: 1)  # the load-following default, fixed for the test
    code, _, _ = run(["generate", "a red circle", *missing], capsys)
    assert code == 2 and calls == [1, before]  # --threads 0 (the default): one thread per idle core, then restored


def test_default_threads_follow_the_load(monkeypatch):
    """One thread per core not already busy (the 1-minute load average), at least one, at most torch's default."""
    from icd import runtime

    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(runtime.torch, "get_num_threads", lambda: 8)
    for load, expected in ((0.2, 8), (2.6, 5), (7.9, 1), (30.0, 1)):
        monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, load, load))
        assert runtime.default_threads() == expected


def test_edit_outputs_and_saved_inversions_are_checked_before_compute(tmp_path, capsys, random_icd_dir):
    """-o equal to --grid, an existing --save-inversion, and an inversion of another model or other adapters are
    refused in one line (exit 2) before anything is written."""
    import torch

    from icd import world
    from icd.editing.inversion import Inversion

    case = world.make_case("color", world.EVAL_SEED_START + 3)
    Image.fromarray(case.source).save(tmp_path / "src.png")
    base = ["edit", str(tmp_path / "src.png"), "--source", case.source_prompt, "--target", case.target_prompt,
            "--model", str(random_icd_dir)]
    code, _, err = run([*base, "-o", str(tmp_path / "x.png"), "--grid", str(tmp_path / "x.png")], capsys)
    _assert_one_line_error(code, err, "same file")
    code, _, _ = run([*base, "-o", str(tmp_path / "a.png"), "--save-inversion", str(tmp_path / "inv")], capsys)
    assert code == 0
    before = (tmp_path / "inv.safetensors").read_bytes()
    code, _, err = run([*base, "-o", str(tmp_path / "b.png"), "--save-inversion", str(tmp_path / "inv")], capsys)
    _assert_one_line_error(code, err, "--force")
    assert (tmp_path / "inv.safetensors").read_bytes() == before and not (tmp_path / "b.png").exists()
    inv = Inversion.load(tmp_path / "inv.json")
    wrong_shape = Inversion(latents=[torch.zeros(1, 4, 64, 64) for _ in inv.timesteps], timesteps=inv.timesteps,
                            prompts=inv.prompts, method="icd", settings={"model": "another"})
    wrong_shape.save(tmp_path / "big")
    code, _, err = run([*base, "-o", str(tmp_path / "c.png"), "--inversion", str(tmp_path / "big.json")], capsys)
    _assert_one_line_error(code, err, "another model")
    other_times = Inversion(latents=inv.latents[:4], timesteps=[19, 333, 666, 999], prompts=inv.prompts,
                            method="icd")
    other_times.save(tmp_path / "times")
    code, _, err = run([*base, "-o", str(tmp_path / "c.png"), "--inversion", str(tmp_path / "times.json")], capsys)
    _assert_one_line_error(code, err, "these adapters")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("argv, message", [(["--n", "100000"], "--n must lie in 1..1024"),
                                           (["--n", "0"], "--n must lie"), (["--scale", "0"], "--scale must lie")])
def test_world_grid_sizes_that_cannot_fit_are_refused(tmp_path, capsys, argv, message):
    code, _, err = run(["world", "grid", *argv, "-o", str(tmp_path / "g.png")], capsys)
    _assert_one_line_error(code, err, message)
    assert not (tmp_path / "g.png").exists()


def test_seeds_devices_and_image_counts_out_of_range_are_refused(tmp_path, capsys):
    out = str(tmp_path / "g.png")
    for bad in ("-1", str(2**64), "1.5"):  # argparse: usage line plus the error, exit code 2
        with pytest.raises(SystemExit) as e:
            main(["generate", "a red star on a gray background", "--seed", bad, "-o", out])
        assert e.value.code == 2 and "--seed" in capsys.readouterr().err
    for argv, message in [(["generate", "a red star on a gray background", "--n", "0", "-o", out], "--n must lie"),
                          (["bench", "inversion", "--device", "tpu", "--out", str(tmp_path / "b")], "unknown device")]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err.strip().splitlines()[-1], err
    if not torch.cuda.is_available():
        code, _, err = run(["bench", "inversion", "--device", "cuda", "--out", str(tmp_path / "b")], capsys)
        _assert_one_line_error(code, err, "no CUDA device")
    assert not (tmp_path / "b").exists() and not (tmp_path / "g.png").exists()


def test_a_folder_without_icd_adapters_still_serves_the_baselines(tmp_path, capsys, random_model_dir):
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(tmp_path / "in.png")
    args = ["invert", str(tmp_path / "in.png"), "--prompt", "a large red circle on a gray background",
            "--model", str(random_model_dir), "--steps", "2", "--json"]
    code, out, _ = run([*args, "--method", "ddim", "-o", str(tmp_path / "r.png")], capsys)
    assert code == 0 and json.loads(out)["nfe"] == 4
    code, _, err = run([*args[:-3], "-o", str(tmp_path / "r2.png")], capsys)  # icd (the default) needs adapters
    _assert_one_line_error(code, err, "no iCD adapters")


def test_help_examples_quote_the_captions_of_the_case_they_make():
    import re

    from icd import world
    from icd.cli import EXAMPLES

    kind, seed = re.search(r"icd world case --kind (\w+) --seed (\d+)", EXAMPLES).groups()
    case = world.make_case(kind, int(seed))
    assert set(re.findall(r'--(?:prompt|source) "([^"]+)"', EXAMPLES)) == {case.source_prompt}
    assert re.findall(r'--target "([^"]+)"', EXAMPLES) == [case.target_prompt]
    assert re.search(r"--blend (\w+) (\w+)", EXAMPLES).groups() == tuple(case.blend_words)


def test_an_internal_error_is_one_line_and_verbose_shows_the_traceback(tmp_path, capsys, monkeypatch):
    import icd.cli.world

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(icd.cli.world.world, "make_case", broken)
    argv = ["world", "case", "--kind", "color", "--seed", "1", "--out", str(tmp_path / "c")]
    code, _, err = run(argv, capsys)
    assert code == 1 and err.strip().splitlines() == [
        "icd: internal error: RuntimeError: boom (re-run with -v for the traceback)"]
    with pytest.raises(RuntimeError, match="boom"):
        main(["-v", *argv])
