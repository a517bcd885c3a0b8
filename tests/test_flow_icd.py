"""iCD on a rectified-flow teacher (docs/flow.md §8): the guidance-distilled FLUX transformer, both adapters on it,
and few-step inversion / editing through the same pipeline, CLI and registry, on a tiny random FLUX folder."""

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel

from conftest import tiny_guidance_and_icd
from icd import world
from icd.cli import main
from icd.distill.guidance import init_student_from_teacher
from icd.editing.controllers import MasaCtrlControls
from icd.editing.edit import EditControls
from icd.imageio import save_image
from icd.models import flux
from icd.models.loading import ModelError, guidance_subfolder, load_icd_model, load_model
from icd.pipeline import Pipeline


@pytest.fixture(scope="module")
def trained(tiny_flux_folder, tmp_path_factory):
    """(the tiny folder after two steps of `icd train guidance`, the same plus 4-step iCD adapters in icd/)."""
    return tiny_guidance_and_icd(tiny_flux_folder, tmp_path_factory.mktemp("flow_icd"),
                                 subfolder=flux.GUIDANCE_SUBFOLDER)


@pytest.fixture(scope="module")
def distilled(trained):
    return trained[0]


@pytest.fixture(scope="module")
def icd_folder(trained):
    return trained[1]


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 3)


# ---------------------------------------------------------------------------------------------- invariants
def test_the_flux_guidance_student_equals_its_teacher_at_every_scale_before_training(tiny_flux_folder):
    teacher = FluxTransformer2DModel.from_pretrained(tiny_flux_folder / "transformer")
    student = init_student_from_teacher(teacher)
    assert student.config.guidance_embeds and not teacher.config.guidance_embeds
    model = load_model(tiny_flux_folder)
    x = torch.randn(2, *model.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(["a small red circle on a white background"] * 2)
    t = torch.tensor([100, 900])
    want = model.eps_fn()(x, t, cond)
    distilled = model.with_unet(student)
    for w in (0.0, 3.0):
        torch.testing.assert_close(distilled.eps_fn(guidance=w)(x, t, cond), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="already embeds"):
        init_student_from_teacher(student)


def test_guidance_distillation_writes_the_flow_layout_and_it_loads_as_guidance_distilled(distilled):
    assert (distilled / flux.GUIDANCE_SUBFOLDER / "config.json").is_file()
    assert not (distilled / "unet_guidance").exists()
    model = load_model(distilled, unet_subfolder=flux.GUIDANCE_SUBFOLDER)
    assert model.kind == "flow" and model.guidance_distilled
    assert not load_model(distilled).guidance_distilled  # the folder's own transformer is still the teacher


def test_a_folder_with_a_distilled_network_and_no_adapters_runs_gddim_not_icd(distilled):
    pipe = Pipeline.from_pretrained(distilled)
    assert pipe.offers("gddim") and not pipe.offers("icd") and pipe.model.guidance_distilled
    assert pipe.generate(["a small red circle on a white background"], method="gddim", steps=2).images.shape[0] == 1


def test_the_adapters_wrap_the_transformers_projections_and_record_them(icd_folder):
    meta = json.loads((icd_folder / "icd" / "adapters.json").read_text())
    assert meta["targets"] == list(flux.LORA_TARGETS)
    assert not (icd_folder / "icd" / "released").exists()  # the released format is the SD UNets' only
    model = load_icd_model(icd_folder, fuse=False)
    wrapped = {name for name, module in model.unet.named_modules() if hasattr(module, "lora_A")}
    kinds = {name.split(".")[-1] for name in wrapped} | {".".join(name.split(".")[-2:]) for name in wrapped}
    for target in ("to_q", "add_q_proj", "to_add_out", "proj_mlp", "norm1.linear", "norm.linear"):
        assert target in kinds, target
    assert any(name.startswith("single_transformer_blocks.") for name in wrapped)


def test_a_flow_model_refuses_a_unet_and_names_the_missing_distillation(tiny_flux_folder, icd_folder):
    with pytest.raises(ModelError, match="transformer_guidance"):
        load_icd_model(icd_folder, unet=str(icd_folder / "transformer"))
    with pytest.raises(ModelError, match="icd train guidance"):
        load_icd_model(tiny_flux_folder)


# ---------------------------------------------------------------------------------------------- end to end
def test_icd_inverts_and_edits_a_flow_model_in_four_plus_four_calls(icd_folder, case):
    pipe = Pipeline.from_pretrained(icd_folder)
    assert pipe.offers("icd") and pipe.offers("flow-ode")
    inv = pipe.invert(case.source[None], [case.source_prompt])
    assert inv.method == "icd" and list(inv.timesteps) == pipe.model.icd.boundaries.forward_schedule()
    for controls in (EditControls(), EditControls(p2p=None, masactrl=MasaCtrlControls()), EditControls(p2p=None)):
        result = pipe.edit(inv, [case.target_prompt], controls=controls)
        assert result.nfe == 4 and result.images.shape == (1, 64, 64, 3), controls.control
        assert result.images.std() > 0
    baseline = pipe.reconstruct(case.source[None], [case.source_prompt], method="flow-ode", steps=4)
    assert baseline.nfe_invert == 4


def test_icd_edit_on_a_flow_folder_uses_icd_by_default_and_reuses_a_saved_inversion(icd_folder, case, tmp_path, capsys):
    src = tmp_path / "src.png"
    save_image(case.source, src)
    common = ["edit", str(src), "--model", str(icd_folder), "--source", case.source_prompt, "--target",
              case.target_prompt]
    rc = main([*common, "--out", str(tmp_path / "out.png"), "--save-inversion", str(tmp_path / "inv.safetensors")])
    assert rc == 0 and (tmp_path / "out.png").is_file()
    assert "icd p2p, 8 UNet calls (4 invert + 4 edit)" in capsys.readouterr().out
    rc = main([*common, "--out", str(tmp_path / "again.png"), "--inversion", str(tmp_path / "inv.safetensors")])
    assert rc == 0 and "4 UNet calls (0 invert + 4 edit)" in capsys.readouterr().out  # a saved inversion: 4 calls
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "out.png").read_bytes()


def test_a_flux_dev_layout_is_its_own_guidance_distilled_network(icd_folder, tmp_path, case):
    """FLUX.1-dev's transformer already embeds its guidance: no transformer_guidance/, the adapters sit on it."""
    dev = tmp_path / "dev"
    shutil.copytree(icd_folder, dev)
    shutil.rmtree(dev / "transformer")
    (dev / flux.GUIDANCE_SUBFOLDER).rename(dev / "transformer")
    assert guidance_subfolder(dev) == "transformer"
    pipe = Pipeline.from_pretrained(dev)
    assert pipe.model.guidance_distilled and pipe.model.icd is not None
    assert pipe.edit(pipe.invert(case.source[None], [case.source_prompt]), [case.target_prompt]).nfe == 4
