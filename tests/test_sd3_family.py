"""The SD3 / SD3.5 family (icd.models.sd3) on tiny random `StableDiffusion3Pipeline` folders: the folder is
diffusers', it loads as family "sd3" / kind "flow", our prompt encoding and our DDIM (Euler) generation are the
pipeline's, the VAE's shift factor round trips, the flow baselines invert and edit with counted calls, MasaCtrl /
swap run on SD3's joint attention (Prompt-to-Prompt is refused in one line), the command line edits, and a folder
without T5 works."""

import numpy as np
import pytest
import torch

from icd import world
from icd.editing.controllers import Controller, MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.models import sd3, tiny

PROMPT = "a large red circle on a gray background"
SD35 = sd3.SD3Size(dual_attention_layers=(0,), qk_norm="rms_norm")  # SD3.5-medium's layout: attn2, QK RMS norms


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sd3.build_random_pipeline(tmp_path_factory.mktemp("sd3") / "pipe", vocabulary=world.vocabulary(),
                                     size=SD35)


@pytest.fixture(scope="module")
def no_t5(tmp_path_factory):
    return sd3.build_random_pipeline(tmp_path_factory.mktemp("sd3") / "no-t5", vocabulary=world.vocabulary(),
                                     t5=False, seed=1)


@pytest.fixture(scope="module")
def pipe(folder):
    from icd.pipeline import Pipeline

    return Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 3)


def _diffusers(folder):
    from diffusers import StableDiffusion3Pipeline

    if (folder / "text_encoder_3").is_dir():
        return StableDiffusion3Pipeline.from_pretrained(folder)
    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)  # as diffusers


def test_the_folder_is_diffusers_and_loads_as_the_sd3_family(folder, pipe):
    from icd.models.loading import family_of, load_model, model_kind

    ref = _diffusers(folder)
    images = ref(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np").images  # a plain call
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    model = load_model(folder)
    assert isinstance(model, sd3.SD3Diffusion) and model.family == "sd3" and model.kind == "flow"
    assert model_kind(folder) == "flow" and family_of(model) is sd3 and pipe.model.family == "sd3"
    assert model.image_size == 64 and model.latent_shape() == (16, 16, 16) and model.size_multiple == 8
    assert model.schedule.shift == 3.0 and not model.guidance_distilled and model.shift_factor == sd3.VAE_SHIFT


@pytest.mark.parametrize("t5", [True, False])
def test_encode_prompt_is_the_pipelines(folder, no_t5, t5):
    from icd.models.loading import load_model

    path = folder if t5 else no_t5
    model, ref = load_model(path), _diffusers(path)
    prompts = [PROMPT, "a small blue square on a white background"]
    cond = model.encode_prompt(prompts)
    embeds, _, pooled, _ = ref.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                             max_sequence_length=model.max_sequence_length)
    assert cond.tokens.shape == (2, tiny.MAX_LENGTH + 20, 64) and cond.pooled.shape == (2, 16 + 32)
    torch.testing.assert_close(cond.tokens, embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled, atol=1e-5, rtol=1e-5)
    if not t5:
        assert bool((cond.tokens[:, tiny.MAX_LENGTH:] == 0).all())


def test_the_vae_latents_carry_the_shift_factor(pipe):
    """z = (mean - shift) * scale and decode(z / scale + shift), as StableDiffusion3Pipeline does."""
    model = pipe.model
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mean = model.vae.encode(x).latent_dist.mean
        z = model.encode_images(x)
        torch.testing.assert_close(z, (mean - sd3.VAE_SHIFT) * sd3.VAE_SCALE)
        ref = model.vae.decode(z / sd3.VAE_SCALE + sd3.VAE_SHIFT).sample.clamp(-1, 1)
        torch.testing.assert_close(model.decode_latents(z), ref)


def test_our_ddim_generation_on_an_sd3_folder_is_the_pipelines_sampling(pipe, folder):
    """`Pipeline.generate(method="ddim")` = StableDiffusion3Pipeline's Euler + CFG on the same noise, on our grid
    (the pipeline's ``sigmas`` = linspace(1, 1/n, n), which it shifts by 3 as our schedule does)."""
    from icd.samplers import initial_noise

    steps, w = 4, 1.5
    got = pipe.generate([PROMPT], method="ddim", steps=steps, guidance=w, seed=3)
    assert got.nfe == steps
    noise = initial_noise((16, 16, 16), [3])
    ref = _diffusers(folder)(PROMPT, negative_prompt="", guidance_scale=1 + w, num_inference_steps=steps, height=64,
                             width=64, max_sequence_length=20, latents=noise, output_type="latent",
                             sigmas=list(np.linspace(1.0, 1.0 / steps, steps))).images
    with torch.no_grad():
        ref_images = pipe.model.decode_latents(ref)  # the transformer's latents: ours
    torch.testing.assert_close(got.images, ref_images, atol=2e-4, rtol=0)  # measured: 2.7e-5


@pytest.mark.parametrize("method, steps, calls", [("flow-ode", 3, 3), ("fireflow", 3, 4), ("rf-inversion", 3, 3),
                                                  ("flowedit", 3, None)])
def test_the_flow_baselines_invert_and_edit_with_counted_calls(pipe, case, method, steps, calls):
    inv = pipe.invert(case.source[None], [case.source_prompt], method=method, steps=steps)
    controls = EditControls(p2p=None) if method in ("flow-ode", "fireflow") else None
    res = pipe.edit(inv, [case.target_prompt], controls)
    assert res.images.shape == (1, 64, 64, 3) and np.isfinite(res.images).all()
    assert res.nfe > 0 and (calls is None or res.nfe == calls)


def test_masactrl_and_swap_on_sd3s_joint_attention_and_p2p_is_refused(pipe, case):
    from icd.editing.attention import attention_layers

    layers = attention_layers(pipe.model.unet)
    assert [(i.stream, i.block, i.index) for i in layers.infos.values()] == [("double", 0, 0), ("double", 1, 1)]
    assert layers.mutual_start == 1
    inv = pipe.invert(case.source[None], [case.source_prompt], method="flow-ode", steps=3)
    swap = pipe.edit(inv, [case.target_prompt], EditControls(p2p=None))
    masa = pipe.edit(inv, [case.target_prompt], EditControls(p2p=None, masactrl=MasaCtrlControls(start_t=999)))
    assert masa.nfe == swap.nfe == 3 and masa.settings.extra["control"] == "masactrl"
    assert not np.array_equal(masa.images, swap.images)
    assert np.abs(masa.reconstructions.astype(int) - swap.reconstructions.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="Prompt-to-Prompt is not supported on SD3"):
        pipe.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls()))
    defaults = {type(p).__name__ for p in pipe.model.unet.attn_processors.values()}
    assert defaults == {"JointAttnProcessor2_0"}  # restored


def test_processors_without_control_are_diffusers(pipe):
    """No controller, and a controller that controls nothing: the transformer's output is diffusers' (1e-5), with
    SD3.5's attn2 and the context_pre_only last block."""
    from icd.editing.attention import attention_layers

    transformer, layers = pipe.model.unet, attention_layers(pipe.model.unet)
    assert transformer.transformer_blocks[-1].context_pre_only and transformer.transformer_blocks[0].attn2 is not None
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 40, 64, generator=g),
                  pooled_projections=torch.randn(2, 48, generator=g), timestep=torch.full((2,), 700.0),
                  return_dict=False)
    with torch.no_grad():
        ref = transformer(**inputs)[0]
        for controller in (None, Controller([0], 4)):
            saved = layers.install(controller)
            try:
                got = transformer(**inputs)[0]
            finally:
                layers.restore(saved)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_the_command_line_edits_an_sd3_folder(folder, no_t5, case, tmp_path, capsys):
    from PIL import Image

    from icd.cli import main

    src = tmp_path / "src.png"
    Image.fromarray(case.source).save(src)
    for model in (folder, no_t5):
        out = tmp_path / f"{model.name}.png"
        code = main(["edit", str(src), "--source", case.source_prompt, "--target", case.target_prompt, "--model",
                     str(model), "--method", "flow-ode", "--steps", "2", "--swap", "--threads", "1", "-o", str(out)])
        assert code == 0, capsys.readouterr()
        assert np.asarray(Image.open(out)).shape[-1] == 3


def test_a_folder_without_t5_generates(no_t5):
    from icd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(no_t5)
    assert pipe.model.text_encoder_3 is None
    got = pipe.generate([PROMPT], method="ddim", steps=2, guidance=1.0, seed=0)
    assert got.nfe == 2 and bool(torch.isfinite(got.images).all())
