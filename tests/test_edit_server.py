"""`icd edit --server URL`: the edit runs in a running `icd serve` (model loaded once), the command imports no torch,
writes the same PNG as a local edit, and refuses what the page cannot take in one line (exit 2)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import free_port, icd_serve
from icd import world
from icd.cli import main

WAIT_S = 300  # loading the embedded model on a busy 2-core machine
SOURCE, TARGET = "a large purple triangle on a gray background", "a large blue triangle on a gray background"
HEAVY = ("torch", "diffusers", "transformers")

# a fresh interpreter: one `icd edit --server` through icd.cli.main, then its exit code, stderr and the heavy
# modules it imported
PROBE = """
import contextlib, io, json, sys
from icd.cli import main
err = io.StringIO()
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "err": err.getvalue(), "out": out.getvalue(),
                  "heavy": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _probe(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with icd_serve(["--model", "embedded", "--threads", "1"], tmp_path_factory.mktemp("serve") / "serve.log",
                   wait_s=WAIT_S, ready="/api/config") as url:
        yield url


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    out = tmp_path_factory.mktemp("case")
    Image.fromarray(world.make_case("color", 1).source).save(out / "source.png")
    return out / "source.png"


def _edit(case, out, *extra) -> list[str]:
    return ["edit", str(case), "--source", SOURCE, "--target", TARGET, "--blend", "purple", "blue", "-o", str(out),
            *extra]


def test_the_server_edit_equals_the_local_edit_and_imports_no_torch(server, case, tmp_path):
    first = _probe(_edit(case, tmp_path / "remote.png", "--server", server, "--json", "--grid",
                         str(tmp_path / "grid.png")))
    assert first["code"] == 0 and first["heavy"] == [], first
    report = json.loads(first["out"])
    assert (report["nfe"], report["nfe_invert"], report["method"], report["control"]) == (8, 4, "icd", "p2p")
    assert not report["cached"] and report["server"] == server and report["output"] == str(tmp_path / "remote.png")
    again = _probe(_edit(case, tmp_path / "again.png", "--server", server, "--json"))
    assert json.loads(again["out"])["cached"] and json.loads(again["out"])["nfe"] == 4  # the server's inversion cache
    assert main(_edit(case, tmp_path / "local.png", "--threads", "1")) == 0
    local = np.asarray(Image.open(tmp_path / "local.png"))
    for name in ("remote.png", "again.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / name)), local), name
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * local.shape[1]  # source | reconstruction | edit


def test_what_the_server_refuses_is_one_line_naming_the_field(server, case, tmp_path):
    r = _probe(["edit", str(case), "--source", SOURCE, "--target", "a large zzyzx triangle on a gray background",
                "-o", str(tmp_path / "e.png"), "--server", server])
    assert r["code"] == 2 and r["heavy"] == [], r
    assert r["err"].startswith("icd: error: the server refused the edit: target: unknown word(s)"), r
    assert len(r["err"].strip().splitlines()) == 1 and not (tmp_path / "e.png").exists()


@pytest.mark.parametrize("extra, message", [
    (["--save-inversion", "inv"], "drop --save-inversion"),
    (["--swap", "--dtype", "fp16"], "drop --swap, --dtype"),
    (["--inversion", "x.json"], "drop --inversion"),
])
def test_options_the_page_lacks_are_refused_before_any_request(case, tmp_path, extra, message):
    r = _probe(_edit(case, tmp_path / "e.png", "--server", "http://127.0.0.1:9", *extra))
    assert r["code"] == 2 and r["heavy"] == [] and message in r["err"], r
    assert len(r["err"].strip().splitlines()) == 1


def test_no_server_and_a_bad_url_are_one_line_errors(case, tmp_path):
    port = free_port()  # nothing listens there
    r = _probe(_edit(case, tmp_path / "e.png", "--server", f"http://127.0.0.1:{port}"))
    assert r["code"] == 2 and f"no icd serve answers at http://127.0.0.1:{port}" in r["err"], r
    r = _probe(_edit(case, tmp_path / "e.png", "--server", "127.0.0.1:7860"))
    assert r["code"] == 2 and "--server expects an http:// or https:// address" in r["err"], r
    r = _probe(["edit", "--batch", str(tmp_path / "x.jsonl"), "--server", "http://127.0.0.1:9"])
    assert r["code"] == 2 and "--server" in r["err"], r
