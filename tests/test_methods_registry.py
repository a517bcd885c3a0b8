"""The method registry (`icd.methods`): one object per method, read by the pipeline, the CLI, the bench and the web
engine. A toy method registered inside a test runs through `icd edit`, `icd bench editing` and the web engine with
no other file changed, and is gone again after the test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from icd import world
from icd.bench.methods import parse_methods
from icd.cli import main
from icd.methods import REGISTRY, Method, Registry
from icd.methods.ddim import DDIM
from icd.pipeline import Pipeline
from icd.web.engine import EditRequest, Engine, web_methods


class ToyDDIM(DDIM):
    """A test's copy of DDIM under another name, with 3 steps by default."""

    name = "toyddim"
    summary = "DDIM with 3 steps (a test's method)"
    default_steps = 3


@pytest.fixture()
def toy():
    with REGISTRY.registered(ToyDDIM()) as method:
        yield method
    assert "toyddim" not in REGISTRY


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("embedded")


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 3)


def test_every_builtin_method_is_registered_once_in_menu_order():
    reverse_only = ["renoise", "renoise-4call", "gnri", "gnri-4call"]  # the reverse model inverted alone
    flow = ["flow-ode", "rf-inversion", "flowedit", "fireflow"]  # a rectified-flow model's baselines
    assert REGISTRY.names() == ["icd", "gddim", "ddim", "npi", "nti", "sdedit", "sdedit-icd", "ip2p", *reverse_only,
                                *flow]
    assert REGISTRY.names("edit") == ["icd", "ddim", "npi", "nti", "sdedit", "sdedit-icd", "ip2p", *reverse_only,
                                      *flow]
    assert REGISTRY.names("reconstruct") == ["icd", "gddim", "ddim", *reverse_only, "flow-ode", "rf-inversion",
                                             "fireflow"]
    assert REGISTRY.names("generate") == ["icd", "gddim", "ddim"]
    assert REGISTRY.names(strength=True) == ["sdedit", "sdedit-icd"]
    assert REGISTRY.names(attention_control=False) == ["sdedit", "sdedit-icd", "ip2p", "rf-inversion", "flowedit"]
    assert REGISTRY.names(option="instruction") == ["ip2p"]


def test_registry_refuses_bad_names_and_duplicates_and_lists_valid_names():
    reg = Registry([ToyDDIM()])
    with pytest.raises(ValueError, match="already registered"):
        reg.register(ToyDDIM())
    for bad in ("", "ddim4", "a:b", "x@y", "a b"):
        odd = type("Odd", (DDIM,), {"name": bad})()
        with pytest.raises(ValueError, match="method name"):
            reg.register(odd)
    with pytest.raises(ValueError, match="unknown task"):
        reg.register(type("Odd", (DDIM,), {"name": "odd", "tasks": ("paint",)})())
    with pytest.raises(TypeError):
        reg.register("ddim")
    with pytest.raises(ValueError, match=r"unknown method 'nope' for edit; choose from toyddim"):
        reg.get("nope", "edit")
    with reg.registered(type("Other", (DDIM,), {"name": "other", "tasks": ("invert", "generate")})()):
        assert reg.names() == ["toyddim", "other"] and reg.names("edit") == ["toyddim"]
    assert reg.names() == ["toyddim"]
    assert isinstance(reg.get("toyddim"), Method)


def test_results_carry_their_settings(pipe, case):
    inv = pipe.invert(case.source[None], [case.source_prompt], method="ddim", steps=3, seed=5)
    assert inv.run.settings.as_dict() | {} == {"method": "ddim", "task": "invert", "guidance": 0.0, "tau": None,
                                               "steps": 3, "renoise": 0.0, "strength": None, "seed": 5,
                                               "ddim_rule": "reference"}
    assert inv.run.nfe == 3 and inv.run.seconds > 0
    out = pipe.edit(inv, [case.target_prompt])
    assert (out.settings.method, out.settings.steps, out.settings.guidance, out.settings.extra["control"]) == (
        "ddim", 3, 1.0, "p2p")
    assert out.nfe == 3
    r = pipe.reconstruct(case.source[None], [case.source_prompt], method="icd", seed=2)
    assert (r.settings.steps, r.settings.tau, r.settings.seed, r.nfe_invert, r.nfe_decode) == (4, 0.8, 2, 4, 4)
    gen = pipe.generate([case.source_prompt], method="icd", seed=1)
    assert (gen.settings.steps, gen.settings.renoise, gen.settings.seed, gen.nfe) == (4, 1.0, 1, 4)
    assert gen.images.shape[0] == 1 and gen.uint8().dtype == np.uint8


def test_a_toy_method_runs_through_the_pipeline_cli_bench_and_web(toy, pipe, case, tmp_path, capsys):
    # the pipeline: 3 DDIM steps by default, the same numbers as ddim with --steps 3
    inv = pipe.invert(case.source[None], [case.source_prompt], method="toyddim")
    assert inv.method == "toyddim" and len(inv.timesteps) == 4
    ref = pipe.edit(pipe.invert(case.source[None], [case.source_prompt], method="ddim", steps=3),
                    [case.target_prompt])
    out = pipe.edit(inv, [case.target_prompt])
    np.testing.assert_array_equal(out.images, ref.images)
    assert out.settings.method == "toyddim" and out.settings.steps == 3

    # `icd edit`: the --method choices read the registry, --json prints the resolved settings
    src = tmp_path / "source.png"
    Image.fromarray(case.source).save(src)
    threads = str(torch.get_num_threads())  # the API's count: the CLI's default follows the load average, and
    # another summation order may move a pixel by one grey level
    code = main(["edit", str(src), "--source", case.source_prompt, "--target", case.target_prompt, "--method",
                 "toyddim", "-o", str(tmp_path / "edit.png"), "--json", "--threads", threads])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["method"], report["nfe_invert"], report["nfe_edit"]) == ("toyddim", 3, 3)
    assert report["settings"]["steps"] == 3 and report["settings"]["method"] == "toyddim"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "edit.png")), ref.images[0])

    # `icd bench editing`: toyddim2 is the toy method at 2 steps
    assert [(m.name, m.method, m.steps) for m in parse_methods("toyddim2,toyddim")] == [
        ("toyddim2", "toyddim", 2), ("toyddim3", "toyddim", 3)]
    out_dir = tmp_path / "bench"
    code = main(["bench", "editing", "--n", "1", "--kinds", "color", "--methods", "toyddim2", "--n-timing", "1",
                 "--examples", "0", "--out", str(out_dir), "--quiet"])
    assert code == 0
    results = json.loads((out_dir / "results.json").read_text())
    assert list(results["methods"]) == ["toyddim2"] and results["methods"]["toyddim2"]["nfe"] == 4

    # the web engine's menu and a run
    assert "toyddim" in web_methods()
    engine = Engine(pipe)
    res = engine.run(EditRequest(image=Image.fromarray(case.source), source=case.source_prompt,
                                 target=case.target_prompt, method="toyddim"))
    assert (res["method"], res["nfe_invert"], res["nfe_edit"]) == ("toyddim", 3, 3)
    assert res["settings"]["steps"] == 3
    client = pytest.importorskip("fastapi.testclient", reason="the web extra is not installed")
    from icd.web.app import create_app  # the optional web extra (fastapi)

    config = client.TestClient(create_app(engine)).get("/api/config").json()
    assert "toyddim" in config["methods"] and config["summaries"]["toyddim"] == ToyDDIM.summary


def test_the_toy_method_is_gone_after_its_test(pipe, case):
    assert "toyddim" not in REGISTRY and "toyddim" not in web_methods()
    with pytest.raises(ValueError, match="unknown method 'toyddim'"):
        pipe.invert(case.source[None], [case.source_prompt], method="toyddim")
    with pytest.raises(SystemExit):  # argparse: an invalid choice
        main(["edit", "x.png", "--source", "a", "--target", "b", "--method", "toyddim", "-o", "y.png"])


def test_a_builtin_method_is_written_once_in_its_entry():
    """Each built-in method's menu is its `BUILTIN` entry alone: the registry answers the menu without importing
    the method's module, and the class, imported on first use, takes its menu from the entry."""
    from icd.editing import ip2p
    from icd.methods import BUILTIN, Entry
    from icd.methods.registry import MENU

    assert [e.name for e in BUILTIN] == REGISTRY.names()
    assert REGISTRY.lookup("ip2p").name == ip2p.METHOD  # the name its inversions carry
    for entry in BUILTIN:
        method = REGISTRY.get(entry.name)
        module, _, qualname = entry.target.partition(":")
        assert (type(method).__module__, type(method).__qualname__) == (module, qualname)
        assert {k: getattr(type(method), k) for k in MENU} == entry.menu()
    reg = Registry([Entry("later", "icd.methods.nowhere:Later", "a method whose module does not exist", ("edit",))])
    assert reg.names("edit") == ["later"] and reg.lookup("later").summary.startswith("a method")
    with pytest.raises(ModuleNotFoundError):
        reg.get("later")
    with pytest.raises(TypeError, match="menu is its entry"):
        type("ICD", (DDIM,), {"__module__": "icd.methods.icd", "summary": "written twice"})
    with pytest.raises(TypeError, match="must be an icd.methods.Method"):
        reg.register(object())
