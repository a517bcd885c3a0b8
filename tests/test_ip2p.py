"""InstructPix2Pix (``ip2p``): instructions from caption diffs, the widened UNet and extended text encoder at init,
two-way CFG, the teacher's triples, a tiny training run (loadable folder, exact resume), `icd edit --method ip2p`
and the bench names, and bad input."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from icd import world
from icd.bench.editing import controls_for
from icd.bench.methods import parse_methods
from icd.cli import main
from icd.editing import ip2p
from icd.editing.instructions import INSTRUCTION_WORDS, edit_of, instruction, reference, vocabulary
from icd.guidance import two_way_cfg
from icd.imageio import save_image
from icd.models.base import PromptError
from icd.pipeline import Pipeline
from icd.train.config import ConfigError
from icd.train.ip2p import IP2PConfig, dropout_masks, train_ip2p
from icd.train.ip2p_data import TripleSpec, edit_controls, load_triples

# ------------------------------------------------------------------------------------------------ instructions

SRC2 = "a small yellow cross and a small blue cross on a brown background"


@pytest.mark.parametrize("kind, source, target, expected", [
    ("color", "a large purple triangle on a gray background", "a large blue triangle on a gray background",
     "make the triangle blue"),
    ("shape", "a large purple triangle on a gray background", "a large purple star on a gray background",
     "turn the triangle into a star"),
    ("background", "a large purple triangle on a gray background", "a large purple triangle on a white background",
     "make the background white"),
    ("size", "a large purple triangle on a gray background", "a small purple triangle on a gray background",
     "make the triangle smaller"),
    ("color", SRC2, "a small orange cross and a small blue cross on a brown background",
     "make the yellow cross orange"),
    ("size", SRC2, "a small yellow cross and a large blue cross on a brown background", "make the blue cross larger"),
    ("shape", "a small red star and a large red star on a gray background",
     "a small red star and a large red circle on a gray background", "turn the large star into a circle"),
    ("color", "a small green circle and a small blue star on a gray background",
     "a small green circle and a small red star on a gray background", "make the star red"),
])
def test_instruction_of_each_kind_names_the_object_unambiguously(kind, source, target, expected):
    assert instruction(source, target, kind) == expected
    assert instruction(source, target, kind) == instruction(source, target, kind)  # deterministic default
    paraphrases = {instruction(source, target, kind, np.random.default_rng(s)) for s in range(40)}
    assert expected in paraphrases and len(paraphrases) == 3
    assert all(set(p.split()) <= set(vocabulary()) for p in paraphrases)


def test_ambiguity_rule_and_the_old_colour_paraphrase():
    assert reference(("small", "red", "star"), [("large", "red", "star")]) == "small star"
    assert reference(("small", "red", "star"), [("small", "blue", "star")]) == "red star"
    assert reference(("small", "red", "star"), [("large", "blue", "star"), ("small", "blue", "star"),
                                                ("large", "red", "star")]) == "small red star"
    assert reference(("small", "red", "star"), [("small", "red", "circle")]) == "star"
    turned = {instruction("a small red star and a large red star on a gray background",
                          "a small blue star and a large red star on a gray background", "color",
                          np.random.default_rng(s)) for s in range(40)}
    assert "turn the small red star blue" in turned and "make the small star blue" in turned


def test_instruction_words_are_exactly_the_templates_additions_and_bad_pairs_are_refused():
    assert set(INSTRUCTION_WORDS) == {"make", "the", "turn", "change", "to", "into", "replace", "with", "larger",
                                      "smaller", "grow", "shrink"}
    assert not set(INSTRUCTION_WORDS) & set(world.vocabulary())
    src = "a large purple triangle on a gray background"
    with pytest.raises(ValueError, match="not a one-word color edit"):
        edit_of(src, "a large blue star on a gray background", "color")
    with pytest.raises(ValueError, match="not a one-word shape edit"):
        edit_of(src, "a large blue triangle on a gray background", "shape")
    with pytest.raises(world.CaptionError):
        instruction("a photo of a cat", src, "color")


# ------------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


def test_widened_unet_at_init_is_the_teacher_for_any_source_latent(pipe):
    teacher = pipe.base().unet
    wide = ip2p.widen_unet(teacher)
    assert wide.config.in_channels == 8 and not wide.conv_in.weight[:, 4:].any()
    x, tokens = torch.randn(3, 4, 16, 16), pipe.base().encode_prompt(["a small red star on a gray background"] * 3)
    with torch.no_grad():
        expected = teacher(x, 700, encoder_hidden_states=tokens.tokens).sample
        for source in (torch.zeros_like(x), torch.randn_like(x) * 3):
            got = wide(torch.cat([x, source], 1), 700, encoder_hidden_states=tokens.tokens).sample
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_extended_text_encoder_reads_world_captions_as_the_teacher_and_adds_mean_rows(pipe, tmp_path):
    m = pipe.base()
    tok, enc, new_ids = ip2p.extend_text_encoder(m.tokenizer, m.text_encoder, vocabulary(), tmp_path / "tok")
    caption = ["a large purple triangle and a small red star on a gray background"]
    old = m.text_encoder(m.token_ids(m.tokenizer, caption))[0]
    torch.testing.assert_close(enc(m.token_ids(tok, caption))[0], old)
    rows = enc.get_input_embeddings().weight
    torch.testing.assert_close(rows[new_ids], m.text_encoder.get_input_embeddings().weight.mean(0).expand(
        len(new_ids), -1))
    assert all(len(tok(w).input_ids) == 3 for w in INSTRUCTION_WORDS)  # one token per new word


def test_two_way_cfg_reduces_to_cfg_and_to_the_conditional():
    u, i, f = torch.randn(3, 2, 4, 4).unbind(0)
    torch.testing.assert_close(two_way_cfg(u, i, f, image_scale=1.0, text_scale=3.0), i + 3.0 * (f - i))
    torch.testing.assert_close(two_way_cfg(u, i, f, image_scale=1.0, text_scale=1.0), f)
    torch.testing.assert_close(two_way_cfg(u, i, f, image_scale=0.0, text_scale=0.0), u)


# ------------------------------------------------------------------------------------------------ data and training


def test_triples_use_the_benchs_ddim_controls_and_training_seeds_only():
    for kind in world.EDIT_KINDS:
        case = world.make_case(kind, 3)
        bench_case = type("C", (), {"kind": kind, "blend_words": case.blend_words})()
        assert edit_controls(kind, [case.blend_words], guidance=1.0) == controls_for("ddim", [bench_case], 1.0, None)
    with pytest.raises(ValueError, match="held-out"):
        TripleSpec(n_chunks=2, chunk=32, seed_start=world.EVAL_SEED_START - 40).check()
    with pytest.raises(ConfigError, match="overlap"):
        IP2PConfig(triple_seed_start=899_999_990)
    with pytest.raises(ConfigError, match="conv_in_lr_scale"):
        IP2PConfig(conv_in_lr_scale=0.0)
    r = torch.linspace(0, 0.9999, 10_000)
    text, image = dropout_masks(r, IP2PConfig())
    assert [round(float(m.float().mean()), 3) for m in (text & ~image, text & image, image & ~text)] == [0.05] * 3


def _cfg(tmp_path, out: str, **kw) -> IP2PConfig:
    return IP2PConfig(out_dir=str(tmp_path / out), triples_dir=str(tmp_path / "triples"), n_chunks=4, chunk=2,
                      teacher_steps=4, steps=3, batch_size=4, warmup_steps=1, checkpoint_every=1, log_every=1,
                      validation_cases=1, validation_steps=2, text_scales=(2.0, 3.0), image_scales=(1.5,), **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ip2p")
    return tmp, train_ip2p(_cfg(tmp, "a"))


def test_training_writes_a_loadable_folder_with_its_cost_and_guidance_choice(trained, pipe):
    tmp, final = trained
    settings = json.loads((final / ip2p.SETTINGS_FILE).read_text())
    data = json.loads((tmp / "triples" / "dataset.json").read_text())
    assert data["generated"] == 8 and 0 < data["kept"] <= 8 and data["generation_seconds"] > 0
    assert settings["dataset"]["kept"] == data["kept"] and settings["training"]["steps"] == 3
    triples = load_triples(tmp / "triples", _cfg(tmp, "a").spec())  # each pair keeps its seed: its exact renders
    assert len(triples.seeds) == len(triples) == data["kept"]
    for i in range(len(triples)):
        case = world.make_case(triples.kinds[i], triples.seeds[i])
        assert (case.source_prompt, case.target_prompt) == (triples.source_captions[i], triples.target_captions[i])
    assert len(settings["guidance_grid"]) == 2 and settings["text_guidance"] in (2.0, 3.0)
    assert not list(final.rglob("*.bin")) and not list(final.rglob("*.pt"))  # safetensors only
    model = ip2p.IP2PModel.load(final, model=pipe.base())
    assert model.unet.config.in_channels == 8 and set(INSTRUCTION_WORDS) <= set(model.vocabulary)
    with pytest.raises(PromptError, match="'bleu' \\(did you mean blue"):
        model.check_instructions(["make the circle bleu"])


def test_an_interrupted_run_resumes_to_identical_weights(trained, tmp_path, monkeypatch):
    from conftest import run_interrupted  # the shared helper of the training tests

    tmp, final = trained
    cfg = _cfg(tmp, "b")
    run_interrupted(train_ip2p, cfg, after=1, monkeypatch=monkeypatch)
    a = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp / "b" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    te_a = load_file(str(final / "text_encoder" / "model.safetensors"))
    te_b = load_file(str(tmp / "b" / "final" / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)


# ------------------------------------------------------------------------------------------------ CLI and bench


@pytest.fixture(scope="module")
def case_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ip2p-case")
    case = world.make_case("color", 1_000_700_001)
    save_image(case.source, tmp / "source.png")
    return tmp, case


def test_cli_edit_counts_k_unet_calls_and_writes_the_image(trained, case_files, capsys):
    _, final = trained
    tmp, case = case_files
    out = tmp / "edit.png"
    assert main(["edit", str(tmp / "source.png"), "--source", case.source_prompt, "--target", case.target_prompt,
                 "--method", "ip2p", "--ip2p", str(final), "--steps", "3", "--json", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["nfe"], report["nfe_invert"], report["nfe_edit"]) == (3, 0, 3) and out.is_file()
    assert report["instruction"] == instruction(case.source_prompt, case.target_prompt, "color")
    assert report["control"] == "none" and report["steps"] == 3


@pytest.mark.parametrize("extra, message", [
    (["--ip2p", "{missing}"], "icd train ip2p"),
    (["--ip2p", "{final}", "--instruction", "make it bleu"], "'bleu'"),
    (["--ip2p", "{final}", "--blend", "blue"], "takes no attention control"),
])
def test_cli_bad_ip2p_input_is_one_line_exit_2(trained, case_files, capsys, extra, message):
    _, final = trained
    tmp, case = case_files
    extra = [e.format(missing=tmp / "no-such-folder", final=final) for e in extra]
    code = main(["edit", str(tmp / "source.png"), "--source", case.source_prompt, "--target", case.target_prompt,
                 "--method", "ip2p", "-o", str(tmp / "bad.png"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("icd: error:") and message in err
    assert main(["edit", str(tmp / "source.png"), "--source", case.source_prompt, "--target", case.target_prompt,
                 "--instruction", "make the circle red", "-o", str(tmp / "bad.png")]) == 2


def test_bench_parses_ip2p_names():
    methods = parse_methods("ip2p8,ip2p100,icd")
    assert [(m.name, m.method, m.steps) for m in methods[:2]] == [("ip2p8", "ip2p", 8), ("ip2p100", "ip2p", 100)]
    assert [m.name for m in parse_methods("ip2p")] == ["ip2p100"]
    assert [m.name for m in parse_methods("ip2p", steps_list=[2, 8])] == ["ip2p2", "ip2p8"]
    with pytest.raises(ValueError, match="not measured"):
        parse_methods("ip2p8", allowed=("icd", "ddim"))


def test_bench_runs_ip2p_rows_with_counted_nfe(trained, tmp_path):
    from icd.bench import BenchOptions, run_bench  # beside the one test that runs the harness

    _, final = trained
    results = run_bench(BenchOptions(task="editing", n=1, methods="ip2p2", ip2p=str(final), out=str(tmp_path / "b"),
                                     n_timing=1, examples=0, progress=False))
    row = results["methods"]["ip2p2"]
    assert row["nfe"] == 2 and set(row["per_kind"]) == set(world.EDIT_KINDS) and "gt_psnr" in row
    with pytest.raises(ip2p.IP2PError, match="icd train ip2p"):
        run_bench(BenchOptions(task="editing", n=1, methods="ip2p2", ip2p=str(tmp_path / "none"),
                               out=str(tmp_path / "c"), progress=False))
