"""Issue 36 §8: `icd --help`, `icd CMD --help`, a one-line error and `icd world …` answer without importing torch,
diffusers or transformers (each takes seconds on a small CPU); the methods' menu is read from `icd.methods` itself
(light: `BUILTIN`'s entries, each method written once), and the option defaults the parsers copy (`icd.cli.catalog`)
equal the library's values."""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys

import pytest

from icd.cli import catalog

HEAVY = ("torch", "diffusers", "transformers")

# Run in a fresh interpreter: each argv through icd.cli.main, then the heavy modules imported so far.
PROBE = """
import contextlib, io, json, sys
from icd.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    out.append({"argv": argv, "code": code, "err": err.getvalue(),
                "heavy": [m for m in HEAVY if m in sys.modules]})
print(json.dumps(out))
""".replace("HEAVY", repr(HEAVY))


def _probe(argvs: list[list[str]], cwd) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def main_help(argv: list[str]) -> str:
    """What `icd ARGV` prints, run in this process (its parsers built from this process's registry)."""
    from icd.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
    return out.getvalue()


def test_help_errors_and_world_load_no_torch(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png"\n')
    commands = [["--help"], ["edit", "--help"], ["generate", "--help"], ["invert", "--help"], ["bench", "--help"],
                ["train", "--help"], ["demo", "--help"], ["serve", "--help"], ["world", "case", "--help"]]
    errors = [["edit", "/nonexistent.png", "--source", "a red circle", "--target", "a blue circle", "-o", "e.png"],
              ["edit", "x.png", "--source", "a", "--target", "b"],  # -o missing
              ["edit", "x.png", "--source", "a", "--target", "b", "--method", "nope", "-o", "e.png"],
              ["edit", "x.png", "--source", "a", "--target", "b", "--strength", "0.5", "-o", "e.png"],
              ["edit", "--batch", "missing.jsonl"], ["edit", "--batch", "bad.jsonl"],
              ["generate", "   ", "-o", "g.png"], ["invert", "/nonexistent.png", "--prompt", "a", "-o", "i.png"],
              ["train", "unet", "--config", "x.toml"], ["world", "grid", "--n", "0", "-o", "g.png"]]
    world = [["world", "case", "--kind", "color", "--seed", "1", "--out", "case"]]
    results = _probe(commands + errors + world, tmp_path)
    for r in results:
        assert r["heavy"] == [], r
    for r in results[:len(commands)]:
        assert r["code"] == 0, r
    for r in results[len(commands):-1]:
        assert r["code"] == 2 and "error:" in r["err"].strip().splitlines()[-1], r  # argparse's usage goes first
        if not r["err"].startswith("usage:"):
            assert len(r["err"].strip().splitlines()) == 1, r
    assert "bad.jsonl line 1: not JSON" in results[len(commands) + 5]["err"]
    assert results[-1]["code"] == 0 and (tmp_path / "case" / "source.png").exists()


def test_import_icd_cli_is_light():
    code = ("import sys, icd.cli, icd.cli.catalog, icd.bench.piebench, icd.methods; "
            "icd.methods.REGISTRY.lookup('ip2p', 'edit'); icd.methods.REGISTRY.names(); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_catalog_equals_the_library():
    from icd import methods, samplers
    from icd.bench import TASKS, BenchOptions
    from icd.cli.train import TRAINERS
    from icd.editing.controllers import MasaCtrlControls, P2PControls
    from icd.editing.edit import EditControls

    assert not hasattr(catalog, "BUILTIN")  # the methods' menu is icd.methods.BUILTIN alone
    assert (catalog.DEFAULT_GUIDANCE, catalog.DEFAULT_RENOISE, catalog.DEFAULT_DDIM_RULE, catalog.DEFAULT_STRENGTH) \
        == (methods.DEFAULT_GUIDANCE, methods.DEFAULT_RENOISE, methods.DEFAULT_DDIM_RULE, methods.DEFAULT_STRENGTH)
    assert catalog.DDIM_RULES == tuple(samplers.DDIM_RULES)
    assert catalog.P2P == {k: getattr(P2PControls(), k) for k in catalog.P2P}
    assert catalog.MASACTRL == {k: getattr(MasaCtrlControls(), k) for k in catalog.MASACTRL}
    assert catalog.EDIT == {k: getattr(EditControls(), k) for k in catalog.EDIT}
    assert catalog.BENCH_TASKS == tuple(TASKS)
    opts = BenchOptions(task="editing", out="o")
    assert catalog.BENCH == {k: getattr(opts, k) for k in catalog.BENCH}
    assert set(catalog.BENCH) >= {f.name for f in dataclasses.fields(BenchOptions)} - {
        "task", "out", "adapters", "export_checkpoint", "force", "progress"}
    assert catalog.TRAINERS == tuple(TRAINERS)
    from icd.models.compiled import MODES

    assert catalog.COMPILE_MODES == MODES


def test_the_menus_answer_from_the_live_registry():
    """A method registered in this process (a plug-in, a test) is in the command line's menus and checks."""
    from icd.methods import REGISTRY
    from icd.methods.ddim import DDIM

    toy = type("Toy", (DDIM,), {"name": "toystartup", "tasks": ("invert", "edit")})()
    with REGISTRY.registered(toy):
        assert "toystartup" in REGISTRY.names("edit") and REGISTRY.lookup("toystartup", "edit") is toy
        assert "toystartup" in main_help(["edit", "--help"])
    assert "toystartup" not in REGISTRY.names()
    with pytest.raises(ValueError, match="choose from icd"):
        REGISTRY.lookup("toystartup")
    for value in (0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="strength"):
            catalog.check_strength(value)
    catalog.check_strength(1.0)
