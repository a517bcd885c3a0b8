"""iCD on the SD3 / SD3.5 family (icd.models.sd3, docs/flow.md §7-§8) on a tiny random SD3.5-medium-shaped folder:
the guidance student (diffusers' transformer + our zero-output `SD3GuidanceEmbedder` on the pooled input) equals its
teacher at every w, `icd train guidance` writes transformer_guidance/ with the embedder beside diffusers' files and it
loads as guidance-distilled, `icd train icd` trains both adapters on it and the pipeline edits in 4 + 4 calls
(MasaCtrl, swap; P2P is refused on SD3). The shipped configs (sd35_icd.toml, flux_icd.toml) parse and run from the
command line on tiny folders."""

import json
import shutil
from pathlib import Path

import pytest
import tomllib
import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import load_file

from conftest import tiny_guidance_and_icd
from icd import world
from icd.cli import main
from icd.distill.guidance import init_student_from_teacher
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.models import flux, sd3
from icd.models.loading import guidance_subfolder, load_model
from icd.pipeline import Pipeline
from icd.train.config import load_config
from icd.train.guidance import GuidanceConfig, train_guidance
from icd.train.icd import ICDConfig

ROOT = Path(__file__).resolve().parents[1]
SD35, FLUX = ROOT / "configs" / "sd35_icd.toml", ROOT / "configs" / "flux_icd.toml"
PROMPT = "a small red circle on a white background"
# what makes a shipped GPU config tiny: world renders at the native size, one step of two rows, one micro-batch (its
# bf16 autocast and gradient checkpointing run as configured, on the CPU)
TINY = ["data=world", "resolution=0", "steps=1", "batch_size=2", "n_images=4", "gradient_accumulation=1",
        "threads=1", "checkpoint_every=1", "log_every=1"]
TINY_ICD = [*TINY, "rank=4"]


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny SD3.5-medium-shaped folder (attn2 and QK norms in block 0), world-word tokenizers, T5."""
    return sd3.build_random_pipeline(tmp_path_factory.mktemp("sd3_icd") / "pipe", vocabulary=world.vocabulary(),
                                     size=sd3.SD3Size(dual_attention_layers=(0,), qk_norm="rms_norm"))


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """(the tiny folder after two steps of `icd train guidance`, the same plus 4-step iCD adapters in icd/)."""
    return tiny_guidance_and_icd(folder, tmp_path_factory.mktemp("sd3_icd_run"), subfolder=sd3.GUIDANCE_SUBFOLDER)


@pytest.fixture(scope="module")
def distilled(trained):
    return trained[0]


@pytest.fixture(scope="module")
def icd_folder(trained):
    return trained[1]


# ---------------------------------------------------------------------------------------------- the student
def test_the_sd3_guidance_student_equals_its_teacher_at_every_scale_before_training(folder):
    teacher = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    student = init_student_from_teacher(teacher)
    assert type(student) is SD3Transformer2DModel and isinstance(student.guidance_embedder, sd3.SD3GuidanceEmbedder)
    model = load_model(folder)
    assert not model.guidance_distilled
    distilled = model.with_unet(student)
    assert distilled.guidance_distilled
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt([PROMPT] * 2)
    t = torch.tensor([100, 900])
    want = model.eps_fn()(x, t, cond)
    for w in (0.0, 1.0, 3.0, 6.0, 19.0):
        torch.testing.assert_close(distilled.eps_fn(guidance=w)(x, t, cond), want, rtol=0, atol=1e-6)
    torch.nn.init.normal_(student.guidance_embedder.embedder.linear_2.weight, std=0.1)  # the input is wired in
    assert not torch.allclose(distilled.eps_fn(guidance=3.0)(x, t, cond), want, atol=1e-4)
    with pytest.raises(ValueError, match="already embeds"):
        init_student_from_teacher(student)


# ---------------------------------------------------------------------------------------------- the stages
def test_guidance_distillation_writes_the_embedder_beside_diffusers_transformer(folder, distilled):
    sub = distilled / sd3.GUIDANCE_SUBFOLDER
    assert (sub / sd3.EMBEDDER_FILE).is_file() and (sub / sd3.EMBEDDER_CONFIG).is_file()
    assert not any("guidance" in k for k in load_file(str(sub / "diffusion_pytorch_model.safetensors")))
    SD3Transformer2DModel.from_pretrained(sub)  # diffusers reads the folder without icd
    assert guidance_subfolder(distilled) == guidance_subfolder(folder) == sd3.GUIDANCE_SUBFOLDER
    model = load_model(distilled, unet_subfolder=sd3.GUIDANCE_SUBFOLDER)
    assert model.family == "sd3" and model.kind == "flow" and model.guidance_distilled
    assert float(model.unet.guidance_embedder.embedder.linear_2.weight.abs().sum()) > 0  # trained away from zero
    x = torch.randn(1, *model.latent_shape(), generator=torch.Generator().manual_seed(1))
    cond = model.encode_prompt([PROMPT])
    assert not torch.equal(model.eps_fn(guidance=0.0)(x, 500, cond), model.eps_fn(guidance=4.0)(x, 500, cond))
    assert not load_model(distilled).guidance_distilled  # the folder's own transformer is still the teacher


def test_the_adapters_wrap_sd3s_projections_and_the_pipeline_edits_in_four_calls(icd_folder):
    meta = json.loads((icd_folder / "icd" / "adapters.json").read_text())
    assert meta["targets"] == list(sd3.LORA_TARGETS)
    pipe = Pipeline.from_pretrained(icd_folder)
    assert pipe.model.family == "sd3" and pipe.model.guidance_distilled and pipe.offers("icd")
    case = world.make_case("color", world.EVAL_SEED_START + 3)
    inv = pipe.invert(case.source[None], [case.source_prompt])
    assert inv.method == "icd" and list(inv.timesteps) == pipe.model.icd.boundaries.forward_schedule()
    for controls in (EditControls(p2p=None), EditControls(p2p=None, masactrl=MasaCtrlControls())):
        result = pipe.edit(inv, [case.target_prompt], controls=controls)
        assert result.nfe == 4 and result.images.shape == (1, 64, 64, 3) and result.images.std() > 0
    with pytest.raises(ValueError, match="Prompt-to-Prompt is not supported on SD3"):
        pipe.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls()))


# ---------------------------------------------------------------------------------------------- the configs
def test_the_new_configs_parse_into_their_dataclasses():
    sd35 = tomllib.loads(SD35.read_text())
    assert list(sd35) == ["guidance", "icd"]
    g, i = load_config(GuidanceConfig, SD35, "guidance"), load_config(ICDConfig, SD35, "icd")
    assert (g.mixed_precision, g.gradient_checkpointing, i.mixed_precision, i.rank) == ("bf16", True, "bf16", 64)
    assert i.unet_subfolder == sd3.GUIDANCE_SUBFOLDER and i.model == g.out_dir + "/final"
    assert list(tomllib.loads(FLUX.read_text())) == ["icd", "icd_schnell"]
    dev, schnell = load_config(ICDConfig, FLUX, "icd"), load_config(ICDConfig, FLUX, "icd_schnell")
    assert dev.unet_subfolder == "transformer" and dev.train == "both"
    assert (schnell.train, schnell.reverse, schnell.forward_cd) == ("forward", "model", False)
    assert not schnell.init_adapters


def test_the_sd35_config_runs_both_stages_from_the_command_line(folder, tmp_path):
    g, i = tmp_path / "G", tmp_path / "I"
    assert main(["train", "guidance", "--config", str(SD35), *_sets(f"model={folder}", f"out_dir={g}", *TINY)]) == 0
    assert (g / "final" / sd3.GUIDANCE_SUBFOLDER / sd3.EMBEDDER_FILE).is_file()
    assert main(["train", "icd", "--config", str(SD35), *_sets(f"model={g / 'final'}", f"out_dir={i}", *TINY_ICD)]) == 0
    meta = json.loads((i / "final" / "adapters.json").read_text())
    assert meta["targets"] == list(sd3.LORA_TARGETS) and meta["rank"] == 4


def test_the_flux_config_trains_on_a_dev_layout(tiny_flux_folder, tmp_path):
    """FLUX.1-dev's layout (guidance embedded in transformer/) from a tiny guidance run; the config's [icd] unchanged
    but for its size. ([icd_schnell]: tests/test_flux_schnell.py.)"""
    distilled = train_guidance(GuidanceConfig(out_dir=str(tmp_path / "G"), model=str(tiny_flux_folder), steps=1,
                                              batch_size=2, n_images=4, checkpoint_every=1, log_every=1, threads=1))
    dev = tmp_path / "dev"
    shutil.copytree(distilled, dev)
    shutil.rmtree(dev / "transformer")
    (dev / flux.GUIDANCE_SUBFOLDER).rename(dev / "transformer")
    out = tmp_path / "I"
    assert main(["train", "icd", "--config", str(FLUX), *_sets(f"model={dev}", f"out_dir={out}", *TINY_ICD)]) == 0
    assert json.loads((out / "final" / "adapters.json").read_text())["targets"] == list(flux.LORA_TARGETS)
