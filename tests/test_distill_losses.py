"""iCD losses on an analytic Gaussian oracle: exact flow-map students make the preservation losses vanish."""

import pytest
import torch

from icd.boundaries import Boundaries
from icd.consistency import consistency_fn
from icd.distill.icd import forward_preserve, reverse_cd, reverse_preserve, reverse_rollout
from icd.losses import min_snr_weight, pseudo_huber
from icd.models.base import Cond
from icd.schedule import NoiseSchedule

S = NoiseSchedule.scaled_linear()
MU, STD = 0.3, 0.8


def flow(x, t, s):
    """Exact probability-flow map for data N(MU, STD^2 I) (hard boundary: time 0 is clean data)."""
    a_t, s_t = S.alpha_sigma(t)
    a_s, s_s = S.alpha_sigma(s)
    r_t, r_s = (a_t**2 * STD**2 + s_t**2).sqrt(), (a_s**2 * STD**2 + s_s**2).sqrt()
    shape = (-1, *([1] * (x.ndim - 1)))
    return (a_s * MU).reshape(shape) + (r_s / r_t).reshape(shape) * (x - (a_t * MU).reshape(shape))


def oracle_eps(target_of):
    """A student whose DDIM jump t -> target_of(t) lands exactly on the flow map."""
    def eps(x, t, cond):
        s = target_of(t)
        a_t, s_t = S.alpha_sigma(t)
        a_s, s_s = S.alpha_sigma(s)
        shape = (-1, *([1] * (x.ndim - 1)))
        ratio = (a_s / a_t).reshape(shape)
        return ((flow(x, t, s) - ratio * x) / (s_s - a_s * s_t / a_t).reshape(shape)).float()
    return eps


def test_boundary_condition_holds_for_any_network():
    rand = lambda x, t, cond: torch.randn_like(x)  # noqa: E731
    x = torch.randn(4, 4, 8, 8)
    for e in (259, 519, 779, 999):
        t = torch.full((4,), e)
        torch.testing.assert_close(consistency_fn(rand, x, t, t, cond=Cond(tokens=torch.zeros(4, 1, 1)), schedule=S), x)


def test_preservation_losses_vanish_for_oracle_students():
    b = Boundaries.preset("4step-1")
    lower_of = {u: max(r, b.start) for r, u in zip(b.reverse, b.forward)}
    upper_of = {v: k for k, v in lower_of.items()}
    reverse = oracle_eps(lambda t: torch.tensor([lower_of[int(v)] for v in t]))
    forward = oracle_eps(lambda t: torch.tensor([upper_of[int(v)] for v in t]))
    z0 = MU + STD * torch.randn(8, 4, 8, 8)
    eps = torch.randn_like(z0)
    cond = Cond(tokens=torch.zeros(8, 2, 3))
    j = torch.arange(8) % 4
    kw = dict(eps=eps, j=j, boundaries=b, schedule=S)
    lf = forward_preserve(forward, lambda w: reverse, z0, cond, **kw)["preserve_forward"]
    lr = reverse_preserve(forward, lambda w: reverse, z0, cond, **kw)["preserve_reverse"]
    assert lf.item() < 1e-4 and lr.item() < 1e-4
    assert b.segment_ends(torch.tensor([0, 3]))[0].tolist() == [19, 779]


def test_reverse_cd_target_never_evaluates_the_student_at_its_boundary():
    b = Boundaries.preset("4step-1")
    seen = []

    def student(x, t, cond):
        seen.append(t.clone())
        return torch.zeros_like(x)

    n = torch.tensor([0, 13, 26, 39, 49])  # t_hi = 19, 279, 539, 799, 999 -> t_lo 0, 259, 519, 779, 979
    z0 = torch.randn(5, 4, 4, 4)
    out = reverse_cd(lambda w: student, lambda w: lambda x, t, c: torch.zeros_like(x), z0,
                     Cond(tokens=torch.zeros(5, 2, 3)), eps=torch.randn_like(z0), n=n, w=torch.zeros(5), boundaries=b,
                     schedule=S)
    assert torch.isfinite(out["cd_reverse"])
    assert seen[0].tolist() == [979]  # target: only the sample whose t_lo is not a boundary
    assert seen[1].tolist() == [19, 279, 539, 799, 999]  # online pass, last (gradient checkpointing needs that)


def test_pseudo_huber_is_near_l1_for_small_c():
    a, b = torch.zeros(100), torch.linspace(-1, 1, 100)
    assert abs(pseudo_huber(a, b, 1e-3).item() - (a - b).abs().mean().item()) < 2e-3
    assert pseudo_huber(a, a).item() == 0.0


def test_min_snr_weight_caps_high_snr_steps_and_leaves_low_snr_steps_alone():
    snr = NoiseSchedule.scaled_linear().snr(torch.tensor([0, 100, 500, 999]))
    w = min_snr_weight(snr, 5.0)
    assert torch.all(w <= 1.0) and torch.all(w > 0)
    assert torch.allclose(w[snr <= 5.0], torch.ones(int((snr <= 5.0).sum())))
    assert torch.allclose(w[snr > 5.0], 5.0 / snr[snr > 5.0].float())
    assert torch.equal(min_snr_weight(snr, 0.0), torch.ones(4))


def test_guidance_student_starts_equal_to_the_conditional_teacher():
    from icd.distill.guidance import guidance_loss, init_student_from_teacher
    from icd.guidance import guidance_embedding
    from icd.models import tiny

    torch.manual_seed(0)
    teacher = tiny.build_unet().eval()
    student = init_student_from_teacher(teacher).eval()
    x, t, tokens = torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 999]), torch.randn(3, 20, 64)
    w = torch.tensor([0.0, 2.0, 7.0])
    with torch.no_grad():
        a = teacher(x, t, tokens).sample
        b = student(x, t, tokens, timestep_cond=guidance_embedding(w)).sample
    torch.testing.assert_close(a, b)

    def teacher_eps(x, t, cond):
        return teacher(x, t, cond.tokens).sample

    def student_eps(w):
        return lambda x, t, cond: student(x, t, cond.tokens, timestep_cond=guidance_embedding(w)).sample

    cond, uncond = Cond(tokens=tokens), Cond(tokens=torch.randn(3, 20, 64))
    z0 = torch.randn(3, 4, 16, 16)
    zero = guidance_loss(student_eps, teacher_eps, z0, cond, uncond=uncond, eps=torch.randn_like(z0), t=t,
                         w=torch.zeros(3), schedule=S)
    assert zero["guidance"].item() < 1e-10  # w = 0: the student already equals the conditional teacher
    guided = guidance_loss(student_eps, teacher_eps, z0, cond, uncond=uncond, eps=torch.randn_like(z0), t=t, w=w,
                           schedule=S)
    assert guided["guidance"].item() > 1e-6


def test_changing_the_boundaries_changes_the_training_targets():
    """Reference defect 1: boundary settings must reach the solver and the losses."""
    def student(w):
        return lambda x, t, cond: 0.1 * x

    def teacher(w):
        return lambda x, t, cond: 0.2 * x

    z0 = torch.randn(4, 4, 4, 4)
    eps, cond, w = torch.randn_like(z0), Cond(tokens=torch.zeros(4, 2, 3)), torch.zeros(4)
    n = torch.tensor([20, 30, 40, 45])  # t_hi = 419, 619, 819, 919
    kw = dict(eps=eps, n=n, w=w, schedule=S)
    a = reverse_cd(student, teacher, z0, cond, boundaries=Boundaries.preset("4step-1"), **kw)["cd_reverse"]
    b = reverse_cd(student, teacher, z0, cond, boundaries=Boundaries.preset("3step"), **kw)["cd_reverse"]
    assert not torch.isclose(a, b)


def test_reverse_rollout_stops_each_row_at_its_boundary_and_matches_the_sampler():
    """R's own latents: the same jumps as the sampler (999 -> 779 -> 519 -> 259), cut at each row's boundary."""
    from icd.samplers import ddim_loop

    b = Boundaries.preset("4step-1")
    calls = []

    def student(w):
        def eps(x, t, cond):
            calls.append(torch.as_tensor(t).expand(len(x)).tolist())
            return 0.5 * x + 0.1 * w.reshape(-1, 1, 1, 1)
        return eps

    x_top, w = torch.randn(3, 4, 4, 4), torch.tensor([0.0, 1.0, 2.0])
    cond = Cond(tokens=torch.zeros(3, 2, 3))
    out = reverse_rollout(student, x_top, cond, w=w, t_stop=torch.tensor([779, 259, 519]), boundaries=b, schedule=S)
    assert calls == [[999, 999, 999], [779, 779], [519]]
    for i, stop in enumerate((779, 259, 519)):
        grid = [t for t in b.reverse_schedule() if t >= stop]
        ref, _ = ddim_loop(student(w[i : i + 1]), x_top[i : i + 1], cond.index([i]), grid, schedule=S)
        torch.testing.assert_close(out[i : i + 1], ref)
    with pytest.raises(ValueError, match="interior"):
        reverse_rollout(student, x_top, cond, w=w, t_stop=torch.tensor([999, 0, 300]), boundaries=b, schedule=S)


def test_reverse_cd_start_rows_begin_at_the_given_latents():
    b = Boundaries.preset("4step-1")
    seen = []

    def student(x, t, cond):
        seen.append((t.clone(), x.clone()))
        return 0.1 * x

    z0 = torch.randn(3, 4, 4, 4)
    eps, n, w, cond = torch.randn_like(z0), torch.tensor([5, 30, 49]), torch.zeros(3), Cond(tokens=torch.zeros(3, 2, 3))
    own = torch.randn(1, 4, 4, 4)
    args = (lambda w: student, lambda w: lambda x, t, c: 0.2 * x, z0, cond)
    kw = dict(eps=eps, n=n, w=w, boundaries=b, schedule=S)
    plain = reverse_cd(*args, **kw)["cd_reverse"]
    seen.clear()
    moved = reverse_cd(*args, **kw, start=(torch.tensor([1]), own, torch.tensor([519])))["cd_reverse"]
    t_online, x_online = seen[-1]
    assert t_online.tolist() == [119, 519, 999]  # row 1 starts at the boundary 519 instead of 619
    torch.testing.assert_close(x_online[1], own[0])
    torch.testing.assert_close(x_online[0], S.add_noise(z0, eps, torch.tensor([119, 619, 999]))[0])
    assert not torch.isclose(plain, moved)
