"""A forward adapter for a few-step generator that exists (FLUX.1-schnell's layout, issue 40 item 3): the folder's own
transformer decodes on its unshifted 4-step grid, unguided (``reverse = "model"``), and only F trains, by L_f. On a
tiny schnell-layout folder: the schedule follows its scheduler config, `icd train icd --section icd_schnell` runs
from the shipped config and saves F alone, and the pipeline's iCD generation is FluxPipeline's own 4-step sampling,
its edits cost 4 + 4 calls, and guidance is refused in one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icd import world
from icd.cli import main
from icd.models import flux, lora
from icd.models import flux_embedded as fe
from icd.models.loading import load_model
from icd.pipeline import Pipeline
from icd.train.config import ConfigError
from icd.train.icd import ICDConfig

ROOT = Path(__file__).resolve().parents[1]
FLUX = ROOT / "configs" / "flux_icd.toml"
PROMPT = "a small red circle on a white background"
TINY = ["data=world", "resolution=0", "steps=2", "batch_size=2", "n_images=4", "gradient_accumulation=1",
        "threads=1", "checkpoint_every=2", "log_every=1", "rank=4", "mixed_precision=no",
        "gradient_checkpointing=false"]


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def schnell(tiny_flux_folder, tmp_path_factory):
    """The tiny flow folder in schnell's layout: no guidance embedding, scheduler at shift 1 without dynamic shift."""
    out = tmp_path_factory.mktemp("schnell") / "pipe"
    shutil.copytree(tiny_flux_folder, out)
    config_file = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text()) | {"use_dynamic_shifting": False, "shift": 1.0}
    config_file.write_text(json.dumps(config))
    assert not json.loads((out / "transformer" / "config.json").read_text()).get("guidance_embeds")
    return out


@pytest.fixture(scope="module")
def trained(schnell, tmp_path_factory):
    """(the adapters folder of two steps of the shipped [icd_schnell] section, the folder with them in icd/)."""
    run = tmp_path_factory.mktemp("schnell_run")
    assert main(["train", "icd", "--config", str(FLUX), "--section", "icd_schnell",
                 *_sets(f"model={schnell}", f"out_dir={run / 'I'}", *TINY)]) == 0
    folder = run / "pipe"
    shutil.copytree(schnell, folder)
    shutil.copytree(run / "I" / "final", folder / "icd")
    return run / "I" / "final", folder


def test_the_schedule_follows_the_scheduler_config(schnell, tiny_flux_folder):
    s = load_model(schnell).schedule
    assert s.shift == 1.0
    grid = s.grid(4)
    assert grid == [249, 499, 749, 999]
    torch.testing.assert_close(s.noise_level(grid[:3]), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    dynamic = load_model(tiny_flux_folder).schedule  # the embedded layout: FLUX.1-dev's dynamic shift, as before
    assert dynamic.shift == pytest.approx(flux.schedule_for(64, 4).shift) and dynamic.shift != 1.0


def test_the_section_saves_the_forward_adapter_alone(trained):
    adapters, _ = trained
    meta = json.loads((adapters / "adapters.json").read_text())
    assert meta["reverse"] == "model" and list(meta["files"]) == [lora.FORWARD]
    assert not (adapters / f"{lora.REVERSE}.safetensors").exists()
    b = meta["boundaries"]
    assert (b["reverse"], b["forward"]) == ([0, 249, 499, 749], [249, 499, 749, 999])
    assert meta["config"]["forward_cd"] is False and meta["config"]["train"] == "forward"


def test_generation_is_flux_pipelines_own_four_steps(trained):
    """The reverse model is the transformer itself: iCD's 4 decode jumps are schnell's 4 Euler steps."""
    from diffusers import FluxPipeline

    from icd.samplers import initial_noise

    _, folder = trained
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.model.icd is not None and not pipe.model.icd.reverse_adapter
    got = pipe.generate([PROMPT], method="icd", seed=3)
    assert got.nfe == 4 and got.settings.guidance == 0
    noise = initial_noise((4, 16, 16), [3])
    ref = FluxPipeline.from_pretrained(folder)(PROMPT, num_inference_steps=4, height=64, width=64,
                                               max_sequence_length=fe.TEXT_LENGTH, latents=fe.pack(noise),
                                               output_type="latent").images
    with torch.no_grad():
        ref_images = pipe.model.decode_latents(fe.unpack(ref))
    torch.testing.assert_close(got.images, ref_images, atol=2e-3, rtol=0)


def test_edits_cost_four_plus_four_and_guidance_is_refused(schnell, trained, tmp_path, capsys):
    adapters, folder = trained
    case = world.make_case("color", 3)
    Image.fromarray(case.source).save(tmp_path / "src.png")
    edit = ["edit", str(tmp_path / "src.png"), "--source", case.source_prompt, "--target", case.target_prompt,
            "--threads", "1", "--json"]
    assert main([*edit, "--model", str(folder), "-o", str(tmp_path / "e.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["nfe_invert"], report["nfe_edit"], report["guidance"]) == (4, 4, 0.0)
    # the bare schnell folder with --adapters: the same edit
    assert main([*edit, "--model", str(schnell), "--adapters", str(adapters), "-o", str(tmp_path / "e2.png")]) == 0
    capsys.readouterr()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e.png")), np.asarray(Image.open(tmp_path / "e2.png")))
    code = main([*edit, "--model", str(folder), "--guidance", "1", "-o", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "guidance (--guidance) must be 0 here" in err and err.count("\n") == 0, err
    assert not (tmp_path / "g.png").exists()
    # ReNoise inverts the generator itself (no forward model) through the same adapters folder
    assert main([*edit, "--model", str(folder), "--method", "renoise", "-o", str(tmp_path / "r.png")]) == 0
    assert json.loads(capsys.readouterr().out)["nfe_edit"] == 4


def test_reverse_model_needs_forward_training_at_w_0():
    with pytest.raises(ConfigError, match="reverse = 'model'"):
        ICDConfig(reverse="model", train="both")
    with pytest.raises(ConfigError, match="w_set = \\[0.0\\]"):
        ICDConfig(reverse="model", train="forward", w_set=(0.0, 1.0))
    with pytest.raises(ConfigError, match="reverse must be one of adapter, model"):
        ICDConfig(reverse="base")
    assert ICDConfig(reverse="model", train="forward", w_set=(0.0,), forward_cd=False).reverse == "model"
