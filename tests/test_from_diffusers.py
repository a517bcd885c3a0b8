"""`Pipeline.from_diffusers`: a pipeline around a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline the
user already loaded shares its modules (nothing is loaded again) and edits exactly as `Pipeline.from_pretrained` on
the same folder: the embedded model, and tiny random SD 1.5 / SDXL pipelines on disk (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from icd import world
from icd.models.loading import ModelError
from icd.models.synthetic import write_pipeline
from icd.paths import embedded_model_path
from icd.pipeline import Pipeline

VOCAB = world.vocabulary()


def _case(size: int):
    case = world.make_case("color", world.EVAL_SEED_START + 2)
    assert case.source.shape[0] == size
    return case


def _same_edits(ours: Pipeline, ref: Pipeline, case, *, methods=("icd", "ddim")) -> None:
    for method in methods:
        kw = {} if method == "icd" else {"steps": 2}
        a = ours.invert(case.source[None], [case.source_prompt], method=method, **kw)
        b = ref.invert(case.source[None], [case.source_prompt], method=method, **kw)
        ea, eb = ours.edit(a, [case.target_prompt]), ref.edit(b, [case.target_prompt])
        np.testing.assert_array_equal(ea.images, eb.images)
        np.testing.assert_array_equal(ea.reconstructions, eb.reconstructions)
        assert ea.nfe == eb.nfe and ea.settings == eb.settings


def test_the_embedded_model_loaded_by_diffusers():
    sd = StableDiffusionPipeline.from_pretrained(embedded_model_path())
    ours = Pipeline.from_diffusers(sd)  # the folder's unet_guidance/ and icd/ beside the loaded modules
    assert ours.base().unet is sd.unet and ours.model.vae is sd.vae and ours.model.text_encoder is sd.text_encoder
    assert ours.model.vocabulary is not None and ours.model.icd is not None
    assert ours.model.counter is ours.base().counter
    _same_edits(ours, Pipeline.from_pretrained("embedded"), _case(64), methods=("icd", "ddim", "npi"))
    assert ours.settings("ddim", "edit").guidance == 1.0  # the world model's defaults, not SD's


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_stable_diffusion_pipelines(family, tmp_path):
    f = write_pipeline(tmp_path, family, vocabulary=VOCAB)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    sd = cls.from_pretrained(f.pipeline)
    ours = Pipeline.from_diffusers(sd, unet=f.unet, lora_forward=f.lora_forward, lora_reverse=f.lora_reverse)
    assert ours.base().unet is sd.unet and ours.icd_model.vae is sd.vae
    if family == "sdxl":
        assert ours.model.text_encoder_2 is sd.text_encoder_2 and ours.model.family == "sdxl"
    ref = Pipeline.from_pretrained(f.pipeline, unet=f.unet, lora_forward=f.lora_forward, lora_reverse=f.lora_reverse)
    assert ours.settings("icd", "edit") == ref.settings("icd", "edit")  # the family's guidance codes and tau
    _same_edits(ours, ref, _case(64))
    baselines = Pipeline.from_diffusers(sd)  # no distilled UNet: the baselines only
    assert baselines.icd_model is None
    with pytest.raises(ModelError, match="iCD adapters"):
        baselines.invert(_case(64).source[None], [_case(64).source_prompt])


def test_from_diffusers_refuses_what_it_cannot_wrap():
    with pytest.raises(ModelError, match="StableDiffusionPipeline"):
        Pipeline.from_diffusers(object())
