"""The rectified-flow baselines as registry methods (docs/baselines.md §13-16): ``flow-ode``, ``rf-inversion``,
``flowedit``, ``fireflow``. Counted calls for given step counts, saved records, the refusal of an epsilon model, the
flow-ODE's Euler decoding against diffusers' scheduler, its reconstruction on the shipped flow model, RF-Inversion's
controlled fields at their limits (gamma = eta = 0 is flow-ode; gamma = 1 lands on y_1, eta = 1 on y_0), FireFlow's
order and FlowEdit's fixed point. On a tiny random FLUX-shaped pipeline unless it says otherwise."""

import importlib.util
import math

import numpy as np
import pytest
import torch

from icd import world
from icd.editing.edit import EditControls
from icd.editing.inversion import Inversion
from icd.imageio import to_uint8
from icd.methods import REGISTRY
from icd.methods.fireflow import FireFlow, fireflow_path, midpoint_time
from icd.methods.flow_ode import euler_path
from icd.methods.flowedit import FlowEdit
from icd.methods.rf_inversion import RFInversion
from icd.metrics import psnr
from icd.models import flux_embedded as fe
from icd.models.base import Cond
from icd.pipeline import Pipeline
from icd.samplers import initial_noise
from icd.schedule import FLOW_TOP, DiscreteFlowSchedule, eps_to_velocity, flow_grid, flux_mu

FLOW = ("flow-ode", "rf-inversion", "flowedit", "fireflow")
needs_joint_attention = pytest.mark.skipif(
    importlib.util.find_spec("icd.editing.joint_attention") is None,
    reason="attention control on a FLUX transformer needs icd.editing.joint_attention (being written); the lead "
           "removes this skip once it lands")


@pytest.fixture(scope="module")
def pipe(tiny_flux_pipe):
    """The shared tiny FLUX pipeline (conftest)."""
    return tiny_flux_pipe


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 3)


def variant(cls, name: str, **options):
    """A registrable copy of a built-in flow method under another name, with other options."""
    sub = type(f"{cls.__name__}Variant", (cls,), {"name": name, "summary": "a test variant", "__module__": __name__})
    return sub(**options)


def reconstruct(pipe, case, method, steps):
    return pipe.reconstruct(case.source[None], [case.source_prompt], method=method, steps=steps)


# ---------------------------------------------------------------------------------------------- counted calls
@pytest.mark.parametrize("method, steps, calls", [("flow-ode", 4, 4), ("rf-inversion", 4, 4), ("fireflow", 4, 5)])
def test_inversion_and_decoding_cost_their_counted_calls(pipe, case, method, steps, calls):
    r = reconstruct(pipe, case, method, steps)
    assert (r.nfe_invert, r.nfe_decode) == (calls, calls)
    assert r.images.shape == (1, 64, 64, 3) and r.settings.method == method and r.settings.steps == steps
    assert r.inversion.timesteps == [0, 249, 499, 749, 999]
    if method == "fireflow":
        assert FireFlow().calls(steps) == calls


def test_default_step_counts_are_the_references(pipe):
    assert {m: pipe.settings(m, "edit").steps for m in FLOW} == {"flow-ode": 50, "rf-inversion": 28, "flowedit": 28,
                                                                  "fireflow": 8}
    st = pipe.settings("flowedit", "edit")
    assert st.guidance == 4.5 and REGISTRY.get("flowedit").source_guidance == 0.5  # CFG 5.5 / 1.5
    assert REGISTRY.get("rf-inversion").eta_steps(28) == (0, 7)


def test_rf_inversion_edits_in_one_call_per_step(pipe, case):
    inv = pipe.invert(case.source[None], [case.source_prompt], method="rf-inversion", steps=4)
    res = pipe.edit(inv, [[case.target_prompt, case.source_prompt]])  # two targets: one batch per step
    assert inv.run.nfe == 4 and res.nfe == 4 and res.images.shape == (2, 64, 64, 3)
    assert res.settings.extra["control"] == "none" and res.settings.extra["eta_steps"] == [0, 1]
    with pytest.raises(ValueError, match="takes no attention control"):
        pipe.edit(inv, [case.target_prompt], EditControls())


@pytest.mark.parametrize("steps, calls", [(None, 24), (8, 7)])
def test_flowedit_is_inversion_free_and_costs_n_max_calls(pipe, case, steps, calls):
    inv = pipe.invert(case.source[None], [case.source_prompt], method="flowedit", steps=steps)
    assert inv.run.nfe == 0 and inv.timesteps == [0]
    res = pipe.edit(inv, [case.target_prompt])
    assert res.nfe == calls == REGISTRY.get("flowedit").calls(steps or 28)
    assert res.settings.extra["n_max"] == calls and res.settings.guidance == 4.5
    vae = to_uint8(pipe.model.decode_latents(pipe.model.encode_images(case.source[None]).contiguous()))
    np.testing.assert_array_equal(res.reconstructions, vae)  # the VAE round trip
    assert "reconstruct" not in REGISTRY.lookup("flowedit").tasks


def test_flowedit_with_its_last_steps_sampled_and_averaged_draws(pipe, case):
    m = variant(FlowEdit, "flowedit-avg", n_avg=2, n_min=2)
    with REGISTRY.registered(m):
        inv = pipe.invert(case.source[None], [case.source_prompt], method="flowedit-avg")
        res = pipe.edit(inv, [case.target_prompt])
    assert res.nfe == 2 * (24 - 2) + 2 == m.calls(28) and np.isfinite(res.images).all()


def test_flowedit_with_the_source_prompt_and_guidance_keeps_the_source(pipe, case):
    """Z_tar = Z_src at the start and both velocities read the same input: their difference is 0 at every step."""
    inv = pipe.invert(case.source[None], [case.source_prompt], method="flowedit", steps=8)
    res = pipe.edit(inv, [case.source_prompt], EditControls(guidance=0.5, p2p=None))
    assert np.abs(res.images.astype(int) - res.reconstructions.astype(int)).max() <= 1


@needs_joint_attention
@pytest.mark.parametrize("method, steps, calls", [("flow-ode", 4, 4), ("fireflow", 4, 5)])
def test_attention_controlled_edits_cost_their_counted_calls(pipe, case, method, steps, calls):
    inv = pipe.invert(case.source[None], [case.source_prompt], method=method, steps=steps)
    for controls, name in ((EditControls(p2p=None), "swap"), (None, "p2p")):
        res = pipe.edit(inv, [case.target_prompt], controls)
        assert res.nfe == calls and res.settings.extra["control"] == name and np.isfinite(res.images).all()


# ---------------------------------------------------------------------------------------------- records
@pytest.mark.parametrize("method", FLOW)
def test_a_saved_record_decodes_as_the_one_that_made_it(pipe, case, method, tmp_path):
    inv = pipe.invert(case.source[None], [case.source_prompt], method=method, steps=4)
    loaded = Inversion.load(inv.save(tmp_path / method))
    pipe.check_inversion(loaded)
    torch.testing.assert_close(pipe.decode(loaded), pipe.decode(inv), rtol=0, atol=0)
    if method in ("rf-inversion", "flowedit"):  # no attention control: the edit needs no joint attention
        a, b = pipe.edit(inv, [case.target_prompt]), pipe.edit(loaded, [case.target_prompt])
        np.testing.assert_array_equal(a.images, b.images)
    if method != "flowedit":
        bad = Inversion(latents=inv.latents, timesteps=[0, 250, 500, 750, 999], prompts=inv.prompts, method=method,
                        settings=inv.settings, model_record=inv.model_record)
        with pytest.raises(ValueError, match="not the flow grid"):
            pipe.check_inversion(bad)


def test_each_flow_method_refuses_an_epsilon_model_in_one_line(random_model_dir, case):
    vp = Pipeline.from_pretrained(random_model_dir)
    for method in FLOW:
        calls = (lambda m=method: vp.invert(case.source[None], [case.source_prompt], method=m),
                 lambda m=method: vp.settings(m, "edit"),
                 lambda m=method: vp.edit(Inversion(latents=[torch.zeros(1, 4, 16, 16)], timesteps=[0],
                                                    prompts=[case.source_prompt], method=m), [case.target_prompt]))
        for call in calls:
            with pytest.raises(ValueError) as err:
                call()
            text = str(err.value)
            assert f"method {method} needs a rectified-flow model such as --model embedded-flow" in text
            assert "\n" not in text


# ---------------------------------------------------------------------------------------------- flow-ode
def test_flow_ode_decoding_is_diffusers_euler_on_the_same_velocities(pipe, tiny_flux_folder, case, monkeypatch):
    """8 Euler steps down our grid = FlowMatchEulerDiscreteScheduler's steps on FluxPipeline's sigmas (the top is
    1 - 1e-5 here, 1 there), fed the velocities our decoding used (v = (eps - x) / (1 - s_t) of each call)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = pipe.model
    inv = pipe.invert(case.source[None], [case.source_prompt], method="flow-ode", steps=8)
    seen, network, unet = [], model.velocity, model._unet

    def recorded(x, t, cond, **kwargs):
        eps = unet(x, t, cond, **kwargs)
        s = model.schedule.noise_level(int(t))
        seen.append((float(s), eps_to_velocity(x, eps, s).float(), network(x, s.float().expand(len(x)), cond,
                                                                           guidance=None)))
        return eps

    monkeypatch.setattr(model, "_unet", recorded)
    ours = pipe.decode(inv)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux_folder / "scheduler")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=flux_mu(fe.IMAGE_TOKENS))
    np.testing.assert_allclose([s for s, _, _ in seen], sched.sigmas[:-1].numpy(), atol=2e-5)
    np.testing.assert_allclose(sched.sigmas.numpy(), flow_grid(8, shift=math.exp(flux_mu(fe.IMAGE_TOKENS))),
                               atol=1e-6)
    x = inv.noise.clone()
    for (_, v, _), t in zip(seen, sched.timesteps):
        x = sched.step(v, t, x).prev_sample
    assert len(seen) == 8 and (ours - x).abs().max() < 1e-4
    v_top = seen[0][1]  # the only difference: the first step starts at 1 - 1e-5, not 1 (1e-5 v more of the way)
    assert (ours - x - (1 - FLOW_TOP) * v_top).abs().max() < 1e-5
    for _, v, v_net in seen:  # the velocity used is the network's (to 0.2 % at the top: the model builds eps_hat
        # with its fp32 time input's 1 - s = 1.0014e-5 there; 1e-6 elsewhere)
        torch.testing.assert_close(v, v_net, rtol=2e-3, atol=1e-5)


def test_flow_ode_reconstructs_a_world_render_on_the_shipped_flow_model(case):
    """50 + 50 Euler steps on the shipped embedded-flow model: measured 33.60 dB (the VAE round trip alone: 33.57
    dB)."""
    pipe = Pipeline.from_pretrained("embedded-flow")
    r = reconstruct(pipe, case, "flow-ode", None)
    assert (r.nfe_invert, r.nfe_decode) == (50, 50)
    assert psnr(r.images, case.source[None])[0] > 32.0


# ---------------------------------------------------------------------------------------------- RF-Inversion
def test_rf_inversion_with_gamma_and_eta_zero_is_flow_ode(pipe, case):
    with REGISTRY.registered(variant(RFInversion, "rf-zero", gamma=0.0, eta=0.0, source_prompt=True)):
        rf = reconstruct(pipe, case, "rf-zero", 6)
        rf_latents = pipe.decode(rf.inversion)
    ode = reconstruct(pipe, case, "flow-ode", 6)
    assert rf.inversion.timesteps == ode.inversion.timesteps
    for a, b in zip(rf.inversion.latents, ode.inversion.latents):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(rf_latents, pipe.decode(ode.inversion), rtol=0, atol=1e-5)
    assert np.abs(rf.images.astype(int) - ode.images.astype(int)).max() <= 1


def test_rf_inversion_controls_at_their_limits(pipe, case):
    """gamma = 1: the forward field is the straight line to y_1, so the inversion lands on (1 - s) z0 + s y_1;
    eta = 1 on every step: the reverse field is the straight line to y_0, so decoding returns z0."""
    with REGISTRY.registered(variant(RFInversion, "rf-one", gamma=1.0, eta=1.0, stop=1.0)):
        inv = pipe.invert(case.source[None], [case.source_prompt], method="rf-one", steps=5, seed=3)
        z = pipe.decode(inv)
    z0, schedule = inv.latents[0], pipe.model.schedule
    y1 = initial_noise(z0.shape[1:], [3], z0.device)
    for t, y in zip(inv.timesteps, inv.latents):
        torch.testing.assert_close(y, schedule.add_noise(z0, y1, t) if t else z0, rtol=0, atol=2e-5)
    torch.testing.assert_close(z, z0, rtol=0, atol=2e-5)
    default = pipe.invert(case.source[None], [case.source_prompt], method="rf-inversion", steps=5, seed=3)
    assert default.settings["gamma"] == 0.5 and default.settings["inversion_prompt"] == "empty"
    assert not torch.allclose(default.noise, inv.noise)


# ---------------------------------------------------------------------------------------------- FireFlow
def test_fireflow_is_second_order_at_one_call_per_step():
    """dx/ds = -x down the embedded model's 8-step grid: FireFlow (9 calls) against Euler (8 calls), both from the
    top level to s = 0, whose exact answer is x e^{s_top}."""
    schedule = DiscreteFlowSchedule.shifted(math.exp(flux_mu(fe.IMAGE_TOKENS)))
    calls = []

    def eps(x, t, cond):
        calls.append(t)
        s = float(schedule.noise_level(t))
        return x.double() + (1.0 - s) * (-x.double())

    x, cond = torch.ones(1, 1, 2, 2, dtype=torch.float64), Cond(tokens=torch.zeros(1, 1, 1))
    exact = math.exp(float(schedule.noise_level(999)))
    errors = {}
    for steps in (8, 16):
        times = list(reversed([0, *schedule.grid(steps)]))
        calls.clear()
        fire = fireflow_path(eps, x, cond, times, schedule=schedule, method="t")[-1]
        assert len(calls) == steps + 1
        euler = euler_path(eps, x, cond, times, schedule=schedule, method="t")[-1]
        errors[steps] = [abs(float(z[0, 0, 0, 0]) - exact) for z in (fire, euler)]
    (fire8, euler8), (fire16, euler16) = errors[8], errors[16]
    assert fire8 < euler8 / 5 and fire8 / fire16 > 3 and euler8 / euler16 < 2.2, errors  # measured 0.0176 / 0.162,
    # halving the steps: FireFlow 3.6x (second order), Euler 1.9x (first)
    times = list(reversed([0, *schedule.grid(8)]))
    for a, b in zip(times, times[1:]):  # the integer midpoints sit within 1 % of the step of the exact midpoint
        s_a, s_b = (float(schedule.alpha_sigma(t)[1]) for t in (a, b))
        c = (float(schedule.noise_level(midpoint_time(schedule, a, b))) - s_a) / (s_b - s_a)
        assert abs(c - 0.5) < 0.01
