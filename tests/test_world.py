import numpy as np
import pytest

from icd import world


def test_scene_is_a_pure_function_of_the_seed():
    for seed in (0, 1, 12345, world.EVAL_SEED_START + 7):
        a, b = world.sample_scene(seed), world.sample_scene(seed)
        assert a == b
        np.testing.assert_array_equal(world.render(a), world.render(b))
    assert world.sample_scene(1) != world.sample_scene(2)


def test_world_has_the_required_variety():
    assert len(world.SHAPES) >= 5 and len(world.COLORS) >= 6 and len(world.SIZES) == 2
    assert len(world.BACKGROUNDS) >= 4
    scenes = [world.sample_scene(s) for s in range(400)]
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}
    assert len({s.background for s in scenes}) == len(world.BACKGROUNDS)
    xs = [o.cx for s in scenes for o in s.objects]
    assert max(xs) - min(xs) > 30  # positions vary
    three = world.sample_scene(5, n_objects=3)
    assert len(three.objects) == 3


def test_objects_never_overlap_and_leave_room_to_grow():
    for seed in range(200):
        scene = world.sample_scene(seed, max_objects=3)
        grown = [world.coverage(world.WorldObject(o.shape, o.color, "large", o.cx, o.cy)) > 0 for o in scene.objects]
        total = np.sum(grown, axis=0)
        assert total.max() <= 1


@pytest.mark.parametrize("seed", range(40))
def test_caption_round_trips_through_the_grammar(seed):
    scene = world.sample_scene(seed, max_objects=3)
    assert world.parse_caption(scene.caption) == scene.attributes


def test_caption_grammar_rejects_bad_sentences():
    for bad in ["", "a red circle on a gray background", "a large red circle on a pink background",
                "a large red circle or a small blue star on a gray background", "a large red zebra"]:
        with pytest.raises(world.CaptionError):
            world.parse_caption(bad)


@pytest.mark.parametrize("kind", ["color", "shape", "background"])
def test_rigid_masks_are_exactly_the_changed_pixels(kind):
    for seed in range(60):
        case = world.make_case(kind, seed)
        changed = np.any(case.source != case.target, axis=-1)
        np.testing.assert_array_equal(case.mask, changed, err_msg=f"{kind} seed {seed}")
        assert case.mask.any()


def test_size_mask_covers_the_change_and_both_object_extents():
    for seed in range(60):
        case = world.make_case("size", seed)
        changed = np.any(case.source != case.target, axis=-1)
        assert not (changed & ~case.mask).any()
        assert case.mask.sum() >= changed.sum() > 0


@pytest.mark.parametrize("kind", world.EDIT_KINDS)
def test_edit_cases_change_exactly_one_word(kind):
    for seed in range(30):
        case = world.make_case(kind, seed)
        src, tgt = case.source_prompt.split(), case.target_prompt.split()
        assert len(src) == len(tgt)
        changed = [(a, b) for a, b in zip(src, tgt) if a != b]
        assert len(changed) in (1, 2)  # the edited object may also move in the left-to-right order
        assert case.blend_words[0] in src and case.blend_words[1] in tgt
        np.testing.assert_array_equal(case.target, world.render(case.target_scene))


def test_unknown_words_message_suggests_close_words():
    msg = world.unknown_words_message(["circel"])
    assert "circle" in msg
