"""The embedded flow (FLUX-shaped) model: tokenizers, packing, the diffusers folder loading offline in FluxPipeline
with a plain call, our Euler + CFG loop reproducing the pipeline, and the trainer's step / resume / config checks."""

import json
import math

import numpy as np
import pytest
import torch

from icd import world
from icd.models import flux_embedded as fe
from icd.schedule import flow_grid, flux_mu
from icd.solver import cfg_combine, euler_step

PROMPT = "a large red circle and a small blue square on a gray background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fe.build_random_pipeline(tmp_path_factory.mktemp("flow") / "pipe", vocabulary=world.vocabulary(),
                                    size=fe.FluxSize(1, 1, 2, 16, (4, 6, 6)))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder)  # the plain call: no dtype, offline (HF_HUB_OFFLINE in conftest)


def test_every_world_word_is_one_token_in_both_tokenizers(pipe):
    words = PROMPT.split()
    t5 = pipe.tokenizer_2(PROMPT).input_ids
    assert len(t5) == len(words) + 1 and t5[-1] == pipe.tokenizer_2.eos_token_id
    assert pipe.tokenizer_2.unk_token_id not in t5
    for word in world.vocabulary():
        assert len(pipe.tokenizer_2(word, add_special_tokens=False).input_ids) == 1, word
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = world.sample_scene(3, n_objects=3).caption
    assert len(pipe.tokenizer_2(longest).input_ids) <= fe.TEXT_LENGTH


def test_packing_and_ids_match_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(fe.pack(x), FluxPipeline._pack_latents(x, 2, 4, 16, 16))
    torch.testing.assert_close(fe.unpack(fe.pack(x)), x)
    torch.testing.assert_close(fe.image_ids(), FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32))


def test_folder_loads_in_flux_pipeline_and_generates_with_a_plain_call(pipe, folder):
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float32
    assert pipe.transformer.config.in_channels == fe.PACKED_CHANNELS and not pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.shift_factor == 0.0 and pipe.scheduler.config.use_dynamic_shifting
    assert json.loads((folder / fe.TEXT_LENGTH_FILE).read_text()) == {"max_sequence_length": fe.TEXT_LENGTH}
    out = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_our_euler_cfg_loop_reproduces_flux_pipeline(pipe):
    """FluxPipeline's true CFG on our grid: x <- x + (s' - s) (v_u + (1 + w - 1)(v_c - v_u)), w = CFG - 1."""
    steps, cfg = 3, 2.5
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = pipe(PROMPT, negative_prompt="", true_cfg_scale=cfg, num_inference_steps=steps, height=64, width=64,
               max_sequence_length=fe.TEXT_LENGTH, latents=fe.pack(noise), output_type="latent").images
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), flow_grid(steps, shift=math.exp(flux_mu(64))),
                               atol=1e-6)

    def encode(text):
        clip = pipe.tokenizer([text], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        t5 = pipe.tokenizer_2([text], padding="max_length", max_length=fe.TEXT_LENGTH, return_tensors="pt").input_ids
        return pipe.text_encoder(clip).pooler_output, pipe.text_encoder_2(t5)[0]

    cond, uncond = encode(PROMPT), encode("")
    grid = flow_grid(steps, shift=math.exp(flux_mu(fe.IMAGE_TOKENS)))
    x = fe.pack(noise)
    with torch.no_grad():
        for s, s_next in zip(grid, grid[1:]):
            v_c, v_u = (fe.velocity(pipe.transformer, x, torch.full((1,), float(s)), pooled=p, tokens=t)
                        for p, t in (cond, uncond))
            x = euler_step(x, cfg_combine(v_c, v_u, cfg - 1), s, s_next)
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)


def test_a_two_level_vae_gives_a_16x16_token_grid_that_flux_pipeline_and_our_model_agree_on(tmp_path):
    """The finer-grid variant (32x32x4 latents, 256 packed tokens): FluxPipeline's plain call generates 64x64 from the
    folder, the training velocity (`fe.velocity`) is the pipeline transformer's call on the 16x16 grid's RoPE ids,
    and `icd`'s loader reads the latent size and the schedule's shift (e^mu of 256 tokens) from the VAE."""
    from diffusers import FluxPipeline

    from icd.models.loading import load_model

    folder = fe.build_random_pipeline(tmp_path / "pipe", vocabulary=world.vocabulary(),
                                      size=fe.FluxSize(1, 1, 2, 16, (4, 6, 6)), vae_levels=2)
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor == 2
    out = pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    pooled, tokens = torch.randn(1, 64), torch.randn(1, fe.TEXT_LENGTH, fe.T5_DIM)
    s = torch.tensor([0.5])
    with torch.no_grad():
        ours = fe.velocity(pipe.transformer, fe.pack(x), s, pooled=pooled, tokens=tokens, latent_size=32)
        ref = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, 1, 4, 32, 32), timestep=s,
                               guidance=None, pooled_projections=pooled, encoder_hidden_states=tokens,
                               txt_ids=torch.zeros(fe.TEXT_LENGTH, 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(1, 16, 16, "cpu", torch.float32),
                               return_dict=False)[0]
    torch.testing.assert_close(ours, ref)
    model = load_model(str(folder))
    assert model.latent_shape()[-2:] == (32, 32)
    assert model.schedule.shift == pytest.approx(math.exp(flux_mu(256)))


def test_t5_tied_embeddings_are_checkpointed_once(tmp_path):
    from icd.train.flow_teacher import _TiedView

    t5 = fe.build_t5(fe.build_t5_tokenizer(tmp_path, world.vocabulary()))
    view = _TiedView(t5)
    assert view.aliases  # encoder.embed_tokens.weight -> shared.weight
    state = {k: v.clone() + 1 for k, v in view.state_dict().items()}
    view.load_state_dict(state)
    assert t5.shared.weight.data_ptr() == t5.encoder.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(t5.encoder.embed_tokens.weight, state["shared.weight"])


def test_flow_teacher_trains_resumes_exactly_and_saves_a_flux_folder(tmp_path):
    from diffusers import FluxPipeline

    from icd.train.config import ConfigError
    from icd.train.flow_teacher import FlowTeacherConfig, export_checkpoint, train_flow_teacher

    base = dict(n_images=8, batch_size=4, num_layers=1, num_single_layers=1, num_attention_heads=2,
                attention_head_dim=16, checkpoint_every=1, log_every=1, warmup_steps=10, threads=1)  # lr: warm-up only
    straight = FlowTeacherConfig(out_dir=str(tmp_path / "a"), steps=3, **base)
    train_flow_teacher(straight)
    train_flow_teacher(FlowTeacherConfig(out_dir=str(tmp_path / "b"), steps=2, **base))
    final = train_flow_teacher(FlowTeacherConfig(out_dir=str(tmp_path / "b"), steps=3, **base))  # resumes at 2

    def losses(run):
        return [line.split(",")[1] for line in (tmp_path / run / "log.csv").read_text().splitlines()[1:]]

    assert losses("a") == losses("b") and len(losses("a")) == 3
    pipe = FluxPipeline.from_pretrained(final)
    assert pipe.transformer.config.num_layers == 1
    # the newest checkpoint's EMA weights, exported, are the final folder's
    exported = FluxPipeline.from_pretrained(export_checkpoint(FlowTeacherConfig(out_dir=str(tmp_path / "b"), **base)))
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        for (k, a), b in zip(getattr(pipe, name).state_dict().items(), getattr(exported, name).state_dict().values()):
            torch.testing.assert_close(a, b, msg=f"{name}.{k}")
    with pytest.raises(ConfigError, match="no checkpoint"):
        export_checkpoint(FlowTeacherConfig(out_dir=str(tmp_path / "none"), **base))


def test_flow_teacher_starts_from_a_folders_weights_and_refuses_another_size(tmp_path, folder):
    """init_from: a run continues from an exported / shipped folder (its step 0 is that folder's weights); a folder
    of another size is a ConfigError naming the component."""
    from diffusers import FluxTransformer2DModel

    from icd.train.config import ConfigError
    from icd.train.flow_teacher import FlowTeacherConfig, _load_weights

    parts = fe.build_parts(tmp_path / "tok", world.vocabulary(), fe.FluxSize(1, 1, 2, 16, (4, 6, 6)))
    _load_weights(parts, folder)
    source = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    for (k, a), b in zip(parts.transformer.state_dict().items(), source.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    other = fe.build_parts(tmp_path / "tok2", world.vocabulary(), fe.FluxSize(1, 2, 2, 16, (4, 6, 6)))
    with pytest.raises(ConfigError, match="transformer does not match"):
        _load_weights(other, folder)
    with pytest.raises(ConfigError, match="no transformer/"):
        _load_weights(other, tmp_path)
    assert FlowTeacherConfig(init_from=str(folder)).init_from == str(folder)


@pytest.mark.parametrize(("key", "value"), [("caption_dropout", 1.0), ("shift", -1.0), ("logit_std", 0.0),
                                            ("attention_head_dim", 9), ("offset_noise", -0.1)])
def test_flow_teacher_config_names_the_bad_field(key, value):
    from icd.train.config import ConfigError
    from icd.train.flow_teacher import FlowTeacherConfig

    with pytest.raises(ConfigError, match=key if key != "attention_head_dim" else "axes_dims_rope"):
        FlowTeacherConfig(**{key: value})


def test_default_training_shift_is_fluxs_for_the_image_token_count():
    from icd.train.flow_teacher import FlowTeacherConfig

    cfg = FlowTeacherConfig()
    assert cfg.training_shift(16) == pytest.approx(math.exp(flux_mu(64))) == pytest.approx(1.596, abs=1e-3)
    assert cfg.training_shift(32) == pytest.approx(math.exp(flux_mu(256))) == pytest.approx(math.exp(0.5))
    assert FlowTeacherConfig(shift=3.0).training_shift(32) == 3.0
    assert cfg.size().axes_dims_rope == (8, 12, 12)


def test_the_shipped_flow_model_loads_in_flux_pipeline_and_generates_with_a_plain_call():
    """The shipped folder, as a user of diffusers would load it: no dtype argument, offline; every module fp32 (the
    transformer and VAE are stored in fp16 and loaded in fp32), one token per world word in both tokenizers."""
    from diffusers import FluxPipeline

    from icd import world
    from icd.paths import embedded_flow_model_path

    folder = embedded_flow_model_path()
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, total
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.transformer.dtype == pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float32
    for word in world.vocabulary():
        assert len(pipe.tokenizer(word).input_ids) == 3, word
    out = pipe("a large red circle on a gray background", num_inference_steps=4, height=64, width=64,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert out.std() > 0.01  # an image, not a constant
