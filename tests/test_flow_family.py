"""The flow family behind the one convention: the integer-time flow schedule (invariants), the velocity seen as
epsilon, `--model embedded-flow` / FLUX folders through `Pipeline`, and our DDIM loop on a flow model reproducing
`FluxPipeline`'s own Euler + true-CFG sampling."""

import math

import numpy as np
import pytest
import torch

from icd import world
from icd.models import flux_embedded as fe
from icd.schedule import NUM_TIMESTEPS, DiscreteFlowSchedule, ddim_grid, flow_grid, flux_mu, velocity_to_eps
from icd.solver import ddim_jump, euler_step

PROMPT = "a large red circle and a small blue square on a gray background"
SHIFT = math.exp(flux_mu(fe.IMAGE_TOKENS))


# ------------------------------------------------------------------------------------------------ invariants
def test_flow_table_is_the_shifted_path_with_clean_zero_and_a_finite_top():
    sched = DiscreteFlowSchedule.shifted(SHIFT)
    assert sched.num_timesteps == NUM_TIMESTEPS
    s = sched.sigmas
    assert bool((s[1:] > s[:-1]).all()) and 0 < float(s[0]) < 0.01 and float(s[-1]) == 1 - 1e-5
    a, sig = sched.alpha_sigma(torch.arange(NUM_TIMESTEPS), hard_zero=False)
    torch.testing.assert_close(a + sig, torch.ones_like(a))
    assert [float(v) for v in sched.alpha_sigma(0)] == [1.0, 0.0]  # hard zero: t = 0 is clean data


@pytest.mark.parametrize("steps", [1, 3, 4, 8, 28, 50])
def test_the_flow_tables_grids_are_fluxs_euler_grids(steps):
    """The flow table's n-step grid = FluxPipeline's shifted linspace(1, 1/n, n): exactly (up to the 1 - 1e-5 top)
    where n divides 1000, where it is then DDIM's grid; else to the nearest integer time (< 1e-3)."""
    sched = DiscreteFlowSchedule.shifted(SHIFT)
    ours = [float(sched.noise_level(t)) for t in reversed(sched.grid(steps))] + [0.0]
    exact = NUM_TIMESTEPS % steps == 0
    np.testing.assert_allclose(ours, flow_grid(steps, shift=SHIFT), atol=2e-5 if exact else 1e-3)
    if exact:
        assert sched.grid(steps) == ddim_grid(steps)


@pytest.mark.parametrize("t_from,t_to", [(999, 749), (749, 0), (0, 249), (249, 999), (500, 500)])
def test_the_ddim_jump_of_a_velocity_seen_as_epsilon_is_the_euler_step(t_from, t_to):
    sched = DiscreteFlowSchedule.shifted(SHIFT)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    s_from = float(sched.noise_level(t_from))
    eps = velocity_to_eps(x.double(), v.double(), s_from)
    s_to = 0.0 if t_to == 0 else float(sched.noise_level(t_to))
    s_src = 0.0 if t_from == 0 else s_from  # a jump from t = 0 treats x as clean data (hard zero)
    expected = euler_step(x, v, s_src, s_to) if t_from else (1 - s_to) * x + s_to * eps.float()
    torch.testing.assert_close(ddim_jump(x, eps, t_from, t_to, schedule=sched), expected, atol=2e-5, rtol=1e-5)


def test_the_top_of_the_grid_costs_no_precision():
    """From s = 1 - 1e-5 the epsilon form divides by 1e-5: with the float64 epsilon the jump still equals Euler."""
    sched = DiscreteFlowSchedule.shifted(SHIFT)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    eps = velocity_to_eps(x.double(), v.double(), float(sched.noise_level(999)))
    x0 = ddim_jump(x, eps, 999, 0, schedule=sched)
    torch.testing.assert_close(x0, x - float(sched.noise_level(999)) * v, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ the family
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fe.build_random_pipeline(tmp_path_factory.mktemp("flux") / "pipe", vocabulary=world.vocabulary(),
                                    size=fe.FluxSize(1, 1, 2, 16, (4, 6, 6)))


@pytest.fixture(scope="module")
def pipe(folder):
    from icd.pipeline import Pipeline

    return Pipeline.from_pretrained(folder)


def test_a_flux_folder_loads_as_the_flux_family(pipe):
    from icd.models.flux import FluxDiffusion

    model = pipe.model
    assert isinstance(model, FluxDiffusion) and model.family == "flux"
    assert model.image_size == 64 and model.latent_shape() == (4, 16, 16) and not model.guidance_distilled
    assert model.schedule.shift == pytest.approx(SHIFT)
    assert model.attention_tokenizer is model.tokenizer_2
    cond = model.encode_prompt([PROMPT, "a small red star on a white background"])
    assert cond.tokens.shape == (2, fe.TEXT_LENGTH, fe.T5_DIM) and cond.pooled.shape == (2, 64)


def test_the_epsilon_is_the_converted_velocity(pipe):
    model = pipe.model
    cond = model.encode_prompt([PROMPT])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    s = model.schedule.noise_level(500)
    with torch.no_grad():
        v = fe.velocity(model.unet, fe.pack(x), torch.full((1,), float(s)), pooled=cond.pooled, tokens=cond.tokens)
        eps = model.eps_fn()(x, 500, cond)
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps.float(), x + (1 - float(s)) * fe.unpack(v), atol=1e-5, rtol=1e-5)


def test_our_ddim_generation_on_a_flux_folder_is_flux_pipelines_sampling(pipe, folder):
    """`Pipeline.generate(method="ddim")` = FluxPipeline's Euler + true CFG (negative prompt "") on the same noise."""
    from diffusers import FluxPipeline

    from icd.samplers import initial_noise

    steps, w = 4, 1.5
    got = pipe.generate([PROMPT], method="ddim", steps=steps, guidance=w, seed=3)
    assert got.nfe == steps
    noise = initial_noise((4, 16, 16), [3])
    ref_pipe = FluxPipeline.from_pretrained(folder)
    ref = ref_pipe(PROMPT, negative_prompt="", true_cfg_scale=1 + w, num_inference_steps=steps, height=64, width=64,
                   max_sequence_length=fe.TEXT_LENGTH, latents=fe.pack(noise), output_type="latent").images
    with torch.no_grad():
        ref_images = pipe.model.decode_latents(fe.unpack(ref))
    torch.testing.assert_close(got.images, ref_images, atol=2e-3, rtol=0)


def test_ddim_on_the_shipped_flow_model_is_flow_ode_inversion_that_round_trips():
    """DDIM inversion on a flow model is flow-ODE (Euler) inversion: 50 + 50 steps on the shipped model reconstruct a
    world render to within a grey level of the VAE's own round trip (measured: 0.24 mean absolute difference)."""
    from icd.imageio import to_uint8
    from icd.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("embedded-flow")
    scene = world.sample_scene(7, n_objects=1)
    image = world.render(scene)[None]
    vae = to_uint8(pipe.model.decode_latents(pipe.model.encode_images(image))).astype(float)
    rec = pipe.reconstruct(image, [scene.caption], method="ddim", steps=50)
    assert rec.nfe_invert == 50 and rec.nfe_decode == 50
    assert np.abs(rec.images.astype(float) - vae).mean() < 1.0


def test_embedded_flow_is_a_model_name():
    from icd.models.loading import resolve_model_path
    from icd.paths import embedded_flow_model_path

    assert resolve_model_path("embedded-flow") == embedded_flow_model_path()


def test_a_flux_folder_without_its_transformer_is_refused_in_one_line(folder, tmp_path):
    import shutil

    from icd.models.loading import ModelError, resolve_model_path

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ModelError, match="lacks component.*transformer"):
        resolve_model_path(broken)


def test_methods_declare_the_model_kinds_they_run_on(pipe):
    from icd.methods import REGISTRY, Entry

    assert "flow-ode" in REGISTRY.names("edit", model="flow") and "flow-ode" not in REGISTRY.names(model="vp")
    assert "ip2p" in REGISTRY.names(model="vp") and "ip2p" not in REGISTRY.names(model="flow")
    assert "ddim" in REGISTRY.names(model="vp") and "ddim" in REGISTRY.names(model="flow")
    with pytest.raises(ValueError, match="ip2p needs an epsilon-prediction"):
        REGISTRY.get("ip2p").model(pipe)
    with pytest.raises(ValueError, match="models must be some of"):
        REGISTRY.register(Entry("odd", "x:Y", "a method of no known kind", models=("sde",)))


def test_bench_defaults_follow_the_model_kind():
    from icd.models.loading import model_kind

    assert model_kind("embedded-flow") == "flow" and model_kind("embedded") == "vp"
