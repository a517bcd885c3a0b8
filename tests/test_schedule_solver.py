from dataclasses import replace

import pytest
import torch

from icd.guidance import dynamic_guidance, guidance_embedding
from icd.models.base import Cond
from icd.samplers import ddim_loop
from icd.schedule import DiscreteFlowSchedule, NoiseSchedule, ddim_grid
from icd.solver import cfg_combine, ddim_jump, renoised_jump

NO_COND = Cond(tokens=torch.zeros(1, 1, 1))  # the oracles below ignore the conditioning
S = NoiseSchedule.scaled_linear()

# method.md §1 regression constants
TABLE = {0: (0.99915, 0.0292), 19: (0.98224, 0.1333), 249: (0.67543, 0.5697), 259: (0.65898, 0.5840),
         339: (0.52489, 0.6893), 499: (0.27767, 0.8499), 519: (0.25158, 0.8651), 699: (0.08313, 0.9575),
         779: (0.04420, 0.9777), 999: (0.00466, 0.9977)}


@pytest.mark.parametrize("t", sorted(TABLE))
def test_schedule_matches_the_spec_table(t):
    abar, sigma = TABLE[t]
    assert float(S.abar[t]) == pytest.approx(abar, abs=1e-5)
    assert float(S.sigma(t)) == pytest.approx(sigma, abs=1e-4)


def test_ddim_grid():
    assert ddim_grid(50) == list(range(19, 1000, 20))
    assert ddim_grid(4) == [249, 499, 749, 999]
    assert ddim_grid(1) == [999]
    with pytest.raises(ValueError):
        ddim_grid(0)


@pytest.mark.parametrize("t", [1, 19, 259, 999])
def test_ddim_jump_to_the_same_time_is_the_identity(t):
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(ddim_jump(x, eps, t, t, schedule=S), x, rtol=0, atol=1e-6)


def test_encode_decode_with_the_exact_eps_is_the_identity():
    x0, eps = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for t in (19, 500, 999):
        x_t = ddim_jump(x0, eps, 0, t, schedule=S)
        torch.testing.assert_close(x_t, S.add_noise(x0, eps, t) if t else x0)
        torch.testing.assert_close(ddim_jump(x_t, eps, t, 0, schedule=S), x0)
    # round trip t -> s -> t with a fixed eps
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ddim_jump(ddim_jump(x, eps, 259, 779, schedule=S), eps, 779, 259, schedule=S), x)


def test_ddim_jump_is_per_sample():
    x, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t_from, t_to = torch.tensor([999, 519, 259]), torch.tensor([779, 259, 0])
    batched = ddim_jump(x, eps, t_from, t_to, schedule=S)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], ddim_jump(x[i : i + 1], eps[i : i + 1], int(t_from[i]),
                                                                  int(t_to[i]), schedule=S))


def test_ddim_jump_computes_in_fp32_for_half_inputs():
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    ref = ddim_jump(x, eps, 999, 0, schedule=S)
    half = ddim_jump(x.half(), eps.half(), 999, 0, schedule=S)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.01)


def test_ddim_converges_on_a_gaussian_oracle():
    """For data N(mu, s^2 I) the ideal eps is known; DDIM error to the exact flow shrinks with more steps."""
    mu, s = 0.7, 0.5

    def eps_star(x, t, cond):
        a, sg = S.alpha(t).float(), S.sigma(t).float()
        return sg * (x - a * mu) / (a**2 * s**2 + sg**2)

    x_T = torch.randn(16, 1, 4, 4)
    a, sg = S.alpha(999).float(), S.sigma(999).float()
    r_T = (a**2 * s**2 + sg**2).sqrt()
    exact = mu + (s / r_T) * (x_T - a * mu)  # flow map to t = 0 with hard boundary (alpha 1, sigma 0 -> r_0 = s)
    errs = []
    for n in (5, 10, 20, 40):
        out, _ = ddim_loop(eps_star, x_T, NO_COND, [*reversed(ddim_grid(n)), 0], schedule=S)
        errs.append(float((out - exact).abs().mean()))
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 0.6 * errs[2]


def test_cfg_combine_and_guidance_helpers():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cfg_combine(c, u, 0.0), c)
    torch.testing.assert_close(cfg_combine(c, u, torch.tensor([0.0, 1.0, 7.0]))[2], 8 * c[2] - 7 * u[2])
    e = guidance_embedding(torch.tensor([0.0, 7.0]))
    assert e.shape == (2, 512)
    torch.testing.assert_close(e[0], torch.cat([torch.zeros(256), torch.ones(256)]))
    w = dynamic_guidance(999, torch.tensor([7.0, 0.0, 19.0]), 0.8)
    assert w.tolist() == [0.0, 0.0, 0.0]
    assert dynamic_guidance(779, torch.tensor([7.0, 19.0]), 0.8).tolist() == [7.0, 19.0]
    assert dynamic_guidance(779, torch.tensor([7.0]), 0.7).tolist() == [0.0]
    assert dynamic_guidance(999, 3.0, None).item() == 3.0


def test_ddim_loop_names_the_step_where_nan_appears():
    from icd.solver import NumericsError

    schedule = NoiseSchedule.scaled_linear()

    def eps_fn(x, t, cond):
        out = torch.zeros_like(x)
        if t == 519:
            out[1] = float("nan")
        return out

    with pytest.raises(NumericsError, match=r"step 2 \(t = 519 -> 259\) in batch rows \[1\]"):
        ddim_loop(eps_fn, torch.randn(3, 4, 2, 2), NO_COND, [999, 779, 519, 259, 0], schedule=schedule)


def test_renoised_jump_interpolates_between_ddim_and_fresh_noise():
    """gamma = 0 is the DDIM jump; gamma = 1 keeps x0_hat and replaces eps by z; a jump to 0 returns x0_hat."""
    s = S
    x, eps, z = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.equal(renoised_jump(x, eps, 779, 519, schedule=s, gamma=0.0, z=z),
                       ddim_jump(x, eps, 779, 519, schedule=s))
    x0 = ddim_jump(x, eps, 779, 0, schedule=s)
    a, sig = s.alpha_sigma(519)
    torch.testing.assert_close(renoised_jump(x, eps, 779, 519, schedule=s, gamma=1.0, z=z), a * x0 + sig * z)
    for gamma in (0.5, 1.0):
        torch.testing.assert_close(renoised_jump(x, eps, 779, 0, schedule=s, gamma=gamma, z=z), x0)
    with pytest.raises(ValueError, match="gamma"):
        renoised_jump(x, eps, 779, 519, schedule=s, gamma=1.5, z=z)


@pytest.mark.parametrize("schedule", [NoiseSchedule.scaled_linear(),
                                      NoiseSchedule.scaled_linear().configured(),
                                      replace(NoiseSchedule.scaled_linear(), set_alpha_to_one=False).configured(),
                                      DiscreteFlowSchedule.shifted(3.0)], ids=["vp", "vp-config", "vp-abar0", "flow"])
@pytest.mark.parametrize("ends", [(999, 749), (259, 0), (0, 259), (19, 19), (500, 999)])
def test_a_loops_jump_on_host_coefficients_equals_the_tensor_jump(schedule, ends):
    """Integer times (a sampling loop's) take `schedule.coefficients`, host floats from a table built once; the
    result is bit-identical to the tensor path's, hard-zero end points included."""
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t_from, t_to = ends
    host = ddim_jump(x, e, t_from, t_to, schedule=schedule)
    tensor = ddim_jump(x, e, torch.tensor(t_from), torch.tensor(t_to), schedule=schedule)
    assert torch.equal(host, tensor)
    for t in ends:
        a, s = schedule.alpha_sigma(t)
        assert schedule.coefficients(t) == (float(a), float(s))
