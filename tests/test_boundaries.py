import pytest
import torch

from icd.boundaries import PRESETS, Boundaries


@pytest.mark.parametrize("name, reverse_sched, forward_sched", [
    ("4step-1", [999, 779, 519, 259, 0], [19, 259, 519, 779, 999]),
    ("4step-2", [999, 699, 499, 249, 0], [19, 249, 499, 699, 999]),
    ("3step", [999, 699, 339, 0], [19, 339, 699, 999]),
])
def test_inference_schedules_of_the_released_configs(name, reverse_sched, forward_sched):
    b = Boundaries.preset(name)
    assert b.reverse_schedule() == reverse_sched
    assert b.forward_schedule() == forward_sched


@pytest.mark.parametrize("name", list(PRESETS))
def test_training_lookup_brackets_every_teacher_step(name):
    b = Boundaries.preset(name)
    grid = torch.arange(19, 1000, 20)
    t_lo = (grid - 20).clamp(min=0)
    s = b.reverse_target(t_lo)
    assert torch.all(s <= t_lo) and torch.all(s >= 0)
    assert torch.all(torch.diff(s) >= 0)  # monotone
    t_lo_f = grid[:-1]
    s_f = b.forward_target(t_lo_f + 20)
    assert torch.all(s_f >= t_lo_f + 20) and torch.all(s_f <= 999)
    assert set(s.tolist()) == set(b.reverse) and set(s_f.tolist()) == set(b.forward)


def test_lookup_reproduces_the_inference_targets():
    b = Boundaries.preset("4step-1")
    # a reverse input at an inference time is trained towards the boundary below it
    assert b.reverse_target(torch.tensor([999 - 20, 779 - 20, 519 - 20, 259 - 20])).tolist() == [779, 519, 259, 0]
    # a forward input at an inference time is trained towards the boundary above it
    assert b.forward_target(torch.tensor([19 + 20, 259 + 20, 519 + 20, 779 + 20])).tolist() == [259, 519, 779, 999]


def test_off_grid_boundary_249_is_reproduced_not_fixed():
    b = Boundaries.preset("4step-2")
    assert b.forward_target(torch.tensor([259])).item() == 499  # the forward pair (239, 259) targets 499
    assert b.reverse_target(torch.tensor([239])).item() == 0


@pytest.mark.parametrize("reverse, forward, needle", [
    ((1, 259), (259, 999), "start at 0"),
    ((0, 259), (259, 998), "end at 999"),
    ((0, 300, 259), (300, 259, 999), "increasing"),
    ((0, 259), (260, 999), "tile"),
    ((0,), (259, 999), "same"),
])
def test_invalid_boundaries_raise(reverse, forward, needle):
    with pytest.raises(ValueError, match=needle):
        Boundaries(reverse, forward)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="4step-1"):
        Boundaries.preset("5step")
