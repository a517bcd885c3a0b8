"""Rectified-flow math (docs/flow.md §1): the path, velocity conversions, the Euler step as the DDIM jump, FLUX's
shifted grid against diffusers' own scheduler, logit-normal training noise levels."""

import math

import numpy as np
import pytest
import torch

from icd.schedule import (
    FlowSchedule,
    NoiseSchedule,
    flow_grid,
    flux_mu,
    logit_normal_sigmas,
    shift_sigmas,
    velocity_target,
    velocity_to_eps,
    velocity_to_x0,
    x0_eps_to_velocity,
)
from icd.solver import ddim_jump, euler_step

F = FlowSchedule()


def _pair(seed=0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_path_endpoints_and_coefficients():
    x0, eps = _pair()
    torch.testing.assert_close(F.add_noise(x0, eps, 0.0), x0)
    torch.testing.assert_close(F.add_noise(x0, eps, 1.0), eps)
    torch.testing.assert_close(F.add_noise(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)
    a, s = F.alpha_sigma(torch.tensor([0.0, 0.3, 1.0]))
    assert a.tolist() == pytest.approx([1.0, 0.7, 0.0]) and s.tolist() == pytest.approx([0.0, 0.3, 1.0])
    # per-sample levels broadcast over the batch
    s_b = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(F.add_noise(x0, eps, s_b)[2], eps[2])
    torch.testing.assert_close(F.add_noise(x0, eps, s_b)[0], x0[0])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_noise_levels_outside_the_unit_interval_are_refused(bad):
    x0, eps = _pair()
    with pytest.raises(ValueError, match="flow noise level"):
        F.add_noise(x0, eps, bad)


def test_velocity_is_the_path_derivative_and_conversions_round_trip():
    x0, eps = _pair(1)
    v = velocity_target(x0, eps)
    h = 1e-6
    torch.testing.assert_close((F.add_noise(x0, eps, 0.4 + h) - F.add_noise(x0, eps, 0.4 - h)) / (2 * h), v)
    for s in (0.0, 0.3, 1.0):  # exact at both ends
        x = F.add_noise(x0, eps, s)
        torch.testing.assert_close(velocity_to_x0(x, v, s), x0)
        torch.testing.assert_close(velocity_to_eps(x, v, s), eps)
        torch.testing.assert_close(x0_eps_to_velocity(velocity_to_x0(x, v, s), velocity_to_eps(x, v, s)), v)


@pytest.mark.parametrize(("s_from", "s_to"), [(0.9, 0.6), (0.6, 0.9), (0.3, 0.0), (0.0, 0.5), (0.7, 0.7)])
def test_euler_step_is_the_ddim_jump_of_the_flow_path(s_from, s_to):
    x, v = _pair(2)
    eps_hat = velocity_to_eps(x, v, s_from)
    torch.testing.assert_close(euler_step(x, v, s_from, s_to), ddim_jump(x, eps_hat, s_from, s_to, schedule=F))
    # identity at s' = s whatever the velocity (the consistency boundary condition), also at s = 1
    torch.testing.assert_close(euler_step(x, v, 1.0, 1.0), x)
    # from pure noise, one step to 0 returns x0_hat
    torch.testing.assert_close(euler_step(x, v, 1.0, 0.0), velocity_to_x0(x, v, 1.0))


def test_euler_step_is_exact_on_the_straight_path_and_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0, eps = _pair(3)
    v = velocity_target(x0, eps)  # the true velocity of one pair is constant along the path
    torch.testing.assert_close(euler_step(F.add_noise(x0, eps, 0.8), v, 0.8, 0.2), F.add_noise(x0, eps, 0.2))
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=[0.8, 0.5, 0.2])
    x = F.add_noise(x0, eps, 0.8).float()
    out = sched.step(v.float(), sched.timesteps[0], x).prev_sample
    s0, s1 = float(sched.sigmas[0]), float(sched.sigmas[1])
    torch.testing.assert_close(out, euler_step(x, v.float(), s0, s1))


def test_per_sample_levels_and_dtype():
    x, v = _pair(4)
    s_from, s_to = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.5, 0.5, 0.0])
    out = euler_step(x.half(), v.half(), s_from, s_to)
    assert out.dtype == torch.float16
    for i in range(3):
        torch.testing.assert_close(euler_step(x[i : i + 1], v[i : i + 1], float(s_from[i]), float(s_to[i])),
                                   x[i : i + 1] + (s_to[i] - s_from[i]).double() * v[i : i + 1])


@pytest.mark.parametrize("tokens", [16, 64, 256, 1024, 4096])
def test_flux_mu_matches_diffusers(tokens):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert flux_mu(tokens) == pytest.approx(calculate_shift(tokens))
    with pytest.raises(ValueError, match="image_seq_len"):
        flux_mu(0)


@pytest.mark.parametrize(("steps", "tokens"), [(50, 64), (28, 4096), (4, 64), (1, 64)])
def test_flow_grid_matches_flux_pipeline_sigmas(steps, tokens):
    """FluxPipeline passes sigmas = linspace(1, 1/N, N) and mu = calculate_shift(L) to a dynamic-shift scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = flux_mu(tokens)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_grid(steps, shift=math.exp(mu))
    assert len(ours) == steps + 1 and ours[0] == 1.0 and ours[-1] == 0.0
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_matches_the_scheduler(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    np.testing.assert_allclose(flow_grid(10, shift=shift), sched.sigmas.numpy(), atol=1e-6)
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert shift_sigmas(s, shift)[0] == 0 and shift_sigmas(s, shift)[-1] == 1  # fixed points
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(s, 0.0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_grid(0)


def test_logit_normal_sigmas():
    g = torch.Generator().manual_seed(0)
    s = logit_normal_sigmas(20000, generator=g)
    assert s.dtype == torch.float32 and s.shape == (20000,) and 0 < s.min() and s.max() < 1
    assert float(s.median()) == pytest.approx(0.5, abs=0.02)  # sigmoid(N(0, 1)) has median 1/2
    # logit(s) ~ N(mean, std^2)
    logit = torch.log(s / (1 - s))
    assert float(logit.std()) == pytest.approx(1.0, abs=0.03)
    shifted = logit_normal_sigmas(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted, shift_sigmas(s.double(), 3.0).float())  # same draws, shifted
    assert float(shifted.median()) == pytest.approx(0.75, abs=0.02)  # shift(1/2) = 3/4
    with pytest.raises(ValueError, match="std"):
        logit_normal_sigmas(4, std=0.0)


def test_vp_schedule_is_unchanged_beside_the_flow_schedule():
    """The VP jump still takes integer timesteps and its hard zero; the flow schedule takes floats."""
    vp = NoiseSchedule.scaled_linear()
    x, eps = _pair(5)
    torch.testing.assert_close(ddim_jump(x, eps, 259, 0, schedule=vp),
                               (x - vp.sigma(259) * eps) / vp.alpha(259))
    # the flow path is a rescaled VP path at the same SNR (docs/flow.md §1.1)
    t = 499
    a, s = vp.alpha(t), vp.sigma(t)
    sigma = float(s / (a + s))
    x0, e = _pair(6)
    torch.testing.assert_close(vp.add_noise(x0, e, t) / (a + s), F.add_noise(x0, e, sigma))
