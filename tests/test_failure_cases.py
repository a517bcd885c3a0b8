"""benchmarks/failure_cases.py's own logic, without a model: its statistics, the layout measure, the case facts and
how a variant changes the bench's controls."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from icd.bench.cases import world_cases
from icd.bench.methods import BenchMethod
from icd.bench.runtime import Shards
from icd.bench.task import RunContext

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "failure_cases.py"


@pytest.fixture(scope="module")
def fc():
    spec = importlib.util.spec_from_file_location("failure_cases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_quantile_and_paired_interval(fc):
    assert fc.t_quantile(0.975, 199) == pytest.approx(1.97196, abs=1e-4)  # tables: t(0.975; 199) = 1.9720
    assert fc.t_quantile(0.975, 9) == pytest.approx(2.26216, abs=1e-3)
    a, b = [3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 3.0]
    p = fc.paired(a, b)
    assert p["mean"] == pytest.approx(2.25) and p["above"] == 4 and p["below"] == 0
    half = fc.t_quantile(0.975, 3) * np.std(np.subtract(a, b), ddof=1) / 2
    assert p["ci95"] == pytest.approx([2.25 - half, 2.25 + half])
    assert "mcnemar_p" not in p
    assert fc.paired([1, 1, 0], [0, 1, 0])["mcnemar_p"] == 1.0  # yes/no metrics get the exact McNemar test
    assert fc.mcnemar_exact(11, 3) == pytest.approx(940 / 16384)


def test_layout_and_facts_of_world_cases(fc):
    color, size = world_cases(["color", "size"], 1)[0], world_cases(["color", "size"], 1)[1]
    assert fc.layout_iou(color, color.target) == 1.0
    moved = np.roll(color.target, 12, axis=1)
    assert fc.layout_iou(color, moved) < 0.9
    facts = fc.case_facts(color)
    assert facts["objects"] in (1, 2) and 0 < facts["mask_fraction"] < 1
    assert facts["edited_size"] in ("small", "large")
    assert isinstance(facts["blend_word_shared"], bool)
    assert "background_change" in fc.case_facts(world_cases(["background"], 1)[0])
    assert fc.case_facts(size)["edited_size"] in ("small", "large")


def test_variants_change_only_what_they_name(fc):
    ctx = RunContext(guidance=1.0, tau=None, shards=Shards("cpu"))
    icd = BenchMethod("icd", "icd")
    color, size = world_cases(["color", "size"], 1)
    base = fc.controls(icd, [color], ctx, None)
    assert base.p2p is not None and base.masactrl is None and base.guidance == 1.0
    w2 = fc.controls(icd, [color], ctx, fc.VARIANTS["w 2"])
    assert w2.guidance == 2.0 and w2.p2p == base.p2p
    cross = fc.controls(icd, [color], ctx, fc.VARIANTS["cross 0.6"])
    assert cross.p2p.cross_replace == 0.6 and cross.p2p.blend_words == base.p2p.blend_words
    assert fc.controls(icd, [color], ctx, fc.VARIANTS["no blend"]).p2p.blend_words is None
    assert fc.controls(icd, [color], ctx, fc.VARIANTS["masactrl t 999"]) is None  # not the kind's control
    assert fc.controls(icd, [size], ctx, fc.VARIANTS["cross 0.6"]) is None
    assert fc.controls(icd, [size], ctx, fc.VARIANTS["masactrl t 999"]).masactrl.start_t == 999
    switched = fc.controls(icd, [size], ctx, fc.VARIANTS["p2p"])
    assert switched.masactrl is None and switched.p2p.blend_words == [((size.blend_words[0],), (size.blend_words[1],))]


def test_failure_types_name_what_the_judge_reads_differently(fc):
    from icd import world

    case = world_cases(["color"], 3)[2]
    target = world.parse_caption(case.target_prompt)
    source = world.parse_caption(case.source_prompt)
    assert fc.failure_type(case, target) is None
    assert fc.failure_type(case, source) == "edited object wrong"  # the edit not made
    assert fc.failure_type(case, world.SceneAttributes(target.background, target.objects[:0])) == "object lost"
    other = "white" if target.background != "white" else "black"
    assert fc.failure_type(case, world.SceneAttributes(other, target.objects)) == "background wrong"
