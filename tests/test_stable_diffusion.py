"""Stable Diffusion 1.5 and SDXL on the CPU: tiny randomly initialised pipelines of both families, written to disk in
the layouts users download (diffusers pipeline folder, guidance-distilled UNet folder, released-format LoRA files),
loaded through the same code a real user runs. No download (HF_HUB_OFFLINE=1)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from icd import world
from icd.boundaries import Boundaries
from icd.cli import main
from icd.cli.common import fit_to_model
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.editing.tokens import replace_mapper, word_spans
from icd.imageio import aspect_size
from icd.io import save_safetensors_atomic
from icd.models import lora, released, sdxl
from icd.models.loading import ModelError, load_model
from icd.models.synthetic import write_pipeline
from icd.pipeline import Pipeline

VOCAB = world.vocabulary()
FAMILIES = ("sd15", "sdxl")


@pytest.fixture(scope="module", params=FAMILIES)
def files(request, tmp_path_factory):
    return request.param, write_pipeline(tmp_path_factory.mktemp(request.param), request.param, vocabulary=VOCAB)


@pytest.fixture(scope="module")
def pipe(files):
    _, f = files
    return Pipeline.from_pretrained(f.pipeline, unet=f.unet, lora_forward=f.lora_forward, lora_reverse=f.lora_reverse)


def _scenes(n: int):
    scenes = [world.sample_scene(20 + i, max_objects=1) for i in range(n)]
    return np.stack([world.render(s) for s in scenes]), [s.caption for s in scenes], scenes


def _recolor(scene) -> str:
    color = scene.objects[0].color
    new = "blue" if color != "blue" else "red"
    return scene.caption.replace(color, new)


def test_family_is_detected_and_sdxl_conditioning_has_its_parts(files):
    family, f = files
    model = load_model(f.pipeline)
    assert model.family == family and model.size_multiple == (64 if family == "sdxl" else 8)
    cond = model.encode_prompt(["a red circle", "a blue square on a white background"])
    assert cond.tokens.shape[:2] == (2, 77)
    if family == "sdxl":
        assert isinstance(model, sdxl.SDXLDiffusion)
        assert cond.tokens.shape[-1] == 64 and cond.pooled.shape == (2, 32)  # 32 + 32 wide encoders, pooled 32
        empty = model.empty_cond(2)
        assert not empty.tokens.any() and not empty.pooled.any()  # force_zeros_for_empty_prompt
        x = torch.zeros(2, 4, 8, 12)
        ids = model.unet_kwargs(cond, x)["added_cond_kwargs"]["time_ids"]
        assert ids.tolist() == [[64, 96, 0, 0, 64, 96]] * 2  # size ids follow the latents (H, W in pixels)
    else:
        assert cond.pooled is None


def test_released_lora_files_load_with_their_boundaries_and_change_the_output(files, pipe):
    family, f = files
    model = pipe.icd_model
    expected = "4step-2" if family == "sdxl" else "4step-1"
    assert f.lora_forward.name == released.released_name("forward", model.icd.boundaries)
    assert model.icd.boundaries == Boundaries.preset(expected)
    assert model.icd.tau == (0.7 if family == "sdxl" else 0.8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(["a red circle on a gray background"])
    teacher = model.eps_fn()(x, 779, cond)
    assert (model.eps_fn(adapter=lora.REVERSE)(x, 779, cond) - teacher).abs().max() > 1e-4
    assert (model.eps_fn(adapter=lora.FORWARD)(x, 779, cond) - teacher).abs().max() > 1e-4


@pytest.mark.parametrize("control", ["p2p", "masactrl", "swap"])
def test_icd_edits_a_batch_of_three_with_counted_nfe(pipe, control):
    images, captions, scenes = _scenes(3)
    targets = [_recolor(s) for s in scenes]
    model = pipe.icd_model
    model.counter.reset()
    inv = pipe.invert(images, captions)
    assert model.counter.calls == 4 and model.counter.batch_sizes == [3] * 4
    controls = EditControls(p2p=P2PControls() if control == "p2p" else None,
                            masactrl=MasaCtrlControls(start_t=999) if control == "masactrl" else None)
    model.counter.reset()
    out = pipe.edit(inv, targets, controls)
    assert out.nfe == 4 and model.counter.batch_sizes == [6] * 4  # [sources; targets], one call per step
    assert out.images.shape == (3, 64, 64, 3) and out.reconstructions.shape == (3, 64, 64, 3)


def test_identical_prompts_reproduce_the_reconstruction(pipe):
    images, captions, _ = _scenes(2)
    inv = pipe.invert(images, captions)
    out = pipe.edit(inv, captions, EditControls(guidance=0.0))
    diff = np.abs(out.images.astype(int) - out.reconstructions.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


@pytest.mark.parametrize("method", ["ddim", "npi", "nti"])
def test_baselines_run_on_the_original_unet(pipe, method):
    images, captions, scenes = _scenes(2)
    pipe.model.counter.reset()
    inv = pipe.invert(images, captions, method=method, steps=2)
    out = pipe.edit(inv, [_recolor(s) for s in scenes])
    assert out.images.shape == (2, 64, 64, 3)
    assert out.nfe == 2  # two-pass CFG is one call on [uncond; cond] per step
    assert pipe.base() is pipe.model_for(method) and pipe.base().unet is not pipe.icd_model.unet


def test_multi_token_words_are_aligned_and_blended_on_all_their_tokens(pipe):
    tok = pipe.model.tokenizer
    source, target = "a red zebra on a gray background", "a blue zebra on a gray background"
    spans = word_spans(tok, source)
    assert len(spans[2]) == 5  # "zebra" is no world word: five letter tokens, as CLIP splits rare words
    mapper = replace_mapper(tok, source, target)
    for j in spans[2]:
        assert mapper[list(spans[2]), j].sum() == pytest.approx(1.0)
    images, _, _ = _scenes(1)
    inv = pipe.invert(images, [source])
    out = pipe.edit(inv, [target], EditControls(p2p=P2PControls(blend_words=(("zebra",), ("zebra",)))))
    assert out.images.shape == (1, 64, 64, 3)


def test_photos_keep_their_aspect_ratio(files, pipe):
    """SD 1.5: a 100x60 photo fits to 80x48 (sides multiples of 8 at ~64² pixels); SDXL (multiples of 64) edits a
    64x128 image as 8x16 latents, its size ids following them. Local blend reads non-square attention maps."""
    family, _ = files
    if family == "sd15":
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 100, 3), dtype=np.uint8))
        fitted = fit_to_model(photo, pipe.model, None)
        assert fitted.size == (80, 48)
    else:
        assert aspect_size(1536, 1024, size=sdxl.NATIVE_SIZE, multiple=sdxl.SIZE_MULTIPLE) == (1280, 832)
        fitted = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    width, height = fitted.size
    inv = pipe.invert(np.asarray(fitted)[None], ["a red circle on a gray background"])
    assert inv.noise.shape == (1, 4, height // 8, width // 8)
    out = pipe.edit(inv, ["a blue circle on a gray background"],
                    EditControls(p2p=P2PControls(blend_words=(("red",), ("blue",)))))
    assert out.images.shape == (1, height, width, 3)


def test_cli_edit_with_released_files_reports_nfe_8(files, tmp_path, capsys):
    _, f = files
    image = tmp_path / "photo.png"
    Image.fromarray(world.render(world.sample_scene(5, max_objects=1))).save(image)
    out = tmp_path / "edit.png"
    code = main(["edit", str(image), "--model", str(f.pipeline), "--unet", str(f.unet), "--lora-forward",
                 str(f.lora_forward), "--lora-reverse", str(f.lora_reverse), "--source", "a red circle",
                 "--target", "a blue circle", "--json", "-o", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["nfe"] == 8 and report["nfe_invert"] == 4 and out.is_file()


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("icd: error:"), err
    return err[0]


def test_cli_refuses_bad_weights_in_one_line(files, tmp_path, capsys):
    _, f = files
    image = tmp_path / "photo.png"
    Image.fromarray(world.render(world.sample_scene(5, max_objects=1))).save(image)
    base = ["edit", str(image), "--model", str(f.pipeline), "--source", "a red circle", "--target", "a blue circle",
            "-o", str(tmp_path / "o.png")]
    swapped = ["--unet", str(f.unet), "--lora-forward", str(f.lora_reverse), "--lora-reverse", str(f.lora_forward)]
    assert main(base + swapped) == 2
    assert "reverse file passed as the forward adapter" in _one_error_line(capsys)
    foreign = tmp_path / f.lora_forward.name
    save_safetensors_atomic({released.PREFIX + "no_such.module.lora_A.weight": torch.zeros(4, 8),
                                      released.PREFIX + "no_such.module.lora_B.weight": torch.zeros(8, 4)}, foreign)
    assert main(base + ["--unet", str(f.unet), "--lora-forward", str(foreign), "--lora-reverse",
                        str(f.lora_reverse)]) == 2
    assert "no_such.module.lora_A.weight" in _one_error_line(capsys)
    assert main(base + ["--unet", str(f.pipeline / "unet")]) == 2  # the original UNet is not guidance-distilled
    assert "not a guidance-distilled UNet" in _one_error_line(capsys)
    assert main(base + ["--unet", str(f.unet), "--lora-forward", str(f.lora_forward)]) == 2
    assert "both --lora-forward and --lora-reverse" in _one_error_line(capsys)
    assert not (tmp_path / "o.png").exists()


def test_a_hub_id_offline_says_what_to_download(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="hf download stabilityai/stable-diffusion-xl-base-1.0"):
        load_model("stabilityai/stable-diffusion-xl-base-1.0")


def test_boundaries_from_every_released_spelling():
    one, two, three = Boundaries.preset("4step-1"), Boundaries.preset("4step-2"), Boundaries.preset("3step")
    for name, direction, expected in [
        ("forward-19-259-519-779.safetensors", "forward", one),
        ("reverse-259-519-779-999.safetensors", "reverse", one),
        ("icd-sd15-forward-19-259-519-779.safetensors", "forward", one),
        ("iCD-SD15-forward_19_259_519_779.safetensors", "forward", one),
        ("forward-19-249-499-699.safetensors", "forward", two),
        ("reverse-339-699-999.safetensors", "reverse", three),
    ]:
        assert released.boundaries_from_name(name) == (direction, expected), name
    assert released.boundaries_from_name("adapter.safetensors") is None
    with pytest.raises(released.ReleasedLoraError):
        released.boundaries_from_name("reverse-259-519-779.safetensors")  # a reverse set must end at 999


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_editing_runs_on_both_families(family, tmp_path, capsys):
    """`icd bench editing` on a pipeline folder in our layout (unet_guidance/ and icd/ inside it): iCD and the three
    baselines, with counted NFE, on world cases (the tiny families' native size is the world's 64 px)."""
    f = write_pipeline(tmp_path / "m", family, vocabulary=VOCAB, own_format=True)
    out = tmp_path / "bench"
    code = main(["bench", "editing", "--model", str(f.pipeline), "--n", "1", "--kinds", "color", "--methods",
                 "icd,ddim2,npi2,nti2", "--n-timing", "1", "--examples", "0", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert (methods["icd"]["nfe_invert"], methods["icd"]["nfe_edit"]) == (4, 4)
    for name in ("ddim2", "npi2", "nti2"):
        assert methods[name]["nfe_edit"] == 2 and np.isfinite(methods[name]["gt_psnr"])


def test_several_targets_per_image_in_one_batch(pipe):
    """Two images with two targets each: one UNet call per step on [2 sources; 4 targets], per-target blend words,
    dynamic CFG per row."""
    images, captions, scenes = _scenes(2)
    targets = [[_recolor(s), s.caption.replace(s.objects[0].shape, "star")] for s in scenes]
    blends = [((s.objects[0].color,), ("blue" if s.objects[0].color != "blue" else "red",)) for s in scenes]
    blends = [blends[0], ((scenes[0].objects[0].shape,), ("star",)), blends[1], ((scenes[1].objects[0].shape,),
                                                                                  ("star",))]
    inv = pipe.invert(images, captions)
    pipe.model.counter.reset()
    out = pipe.edit(inv, targets, EditControls(p2p=P2PControls(blend_words=blends)))
    assert out.nfe == 4 and pipe.model.counter.batch_sizes == [6] * 4
    assert out.images.shape == (4, 64, 64, 3) and out.reconstructions.shape == (2, 64, 64, 3)
