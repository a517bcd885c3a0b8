"""PIE-Bench loader: RLE masks, prompt brackets, fixture round trip through the public layout, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from icd import world
from icd.bench import piebench
from icd.bench.piebench import PieBenchError


@pytest.fixture(scope="module")
def world_cases() -> list[world.EditCase]:
    cases = piebench.fixture_cases(2)
    assert [c.kind for c in cases] == [k for k in world.EDIT_KINDS for _ in range(2)]
    return cases


@pytest.fixture
def fixture_dir(tmp_path, world_cases):
    return piebench.write_fixture(tmp_path / "pie", world_cases)


# ----------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("seed", range(8))
def test_rle_round_trip_without_border(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    mask = rng.random((h, w)) < rng.uniform(0.0, 1.0)
    rle = piebench.encode_mask(mask)
    assert all(isinstance(v, int) for v in rle) and len(rle) % 2 == 0
    np.testing.assert_array_equal(piebench.decode_mask(rle, h, w, border=False), mask)


def test_rle_of_empty_and_full_masks():
    assert piebench.encode_mask(np.zeros((3, 4), bool)) == []
    assert piebench.encode_mask(np.ones((3, 4), bool)) == [0, 12]
    assert not piebench.decode_mask([], 3, 4, border=False).any()


def test_border_option_sets_the_outermost_rows_and_columns():
    mask = piebench.decode_mask([], 5, 6)  # border=True is the default
    assert mask.dtype == bool and mask.shape == (5, 6)
    assert mask[0].all() and mask[-1].all() and mask[:, 0].all() and mask[:, -1].all()
    assert not mask[1:-1, 1:-1].any()


def test_hand_written_rle_decodes_row_major_and_clips_the_last_run():
    rle = [1, 2, 6, 1, 10, 99]  # 4 x 3 image: pixels 1-2, pixel 6, pixels 10.. (clipped at 12)
    expected = np.array([[0, 1, 1],
                         [0, 0, 0],
                         [1, 0, 0],
                         [0, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(piebench.decode_mask(rle, 4, 3, border=False), expected)
    with_border = piebench.decode_mask(rle, 4, 3)
    np.testing.assert_array_equal(with_border[1:-1, 1:-1], expected[1:-1, 1:-1])
    assert with_border[0].all() and with_border[:, 0].all()


@pytest.mark.parametrize("rle, message", [
    ([0, 1, 5], "odd number"),
    ([12, 1], "outside 0..11"),
    ([-1, 1], "outside 0..11"),
    ([0, -2], "negative"),
    ([0, "3"], "expected an integer"),
    ([True, 1], "boolean"),
])
def test_bad_rle_raises(rle, message):
    with pytest.raises(PieBenchError, match=message):
        piebench.decode_mask(rle, 3, 4)


# ----------------------------------------------------------------------------------------------- prompts


def test_bracketed_words_and_strip():
    prompt = "a  [cat] sitting on [the  green] grass"
    assert piebench.bracketed_words(prompt) == ["cat", "the green"]
    assert piebench.strip_brackets(prompt) == "a cat sitting on the green grass"
    assert piebench.bracketed_words("no brackets here") == []


# ----------------------------------------------------------------------------------------------- fixture round trip


def test_fixture_has_the_public_layout(fixture_dir, world_cases):
    mapping = json.loads((fixture_dir / "mapping_file.json").read_text())
    ids = piebench.fixture_ids(world_cases)
    assert sorted(mapping) == sorted(ids) and all(len(i) == 12 and i.isdigit() for i in ids)
    for case_id, case in zip(ids, world_cases):
        entry = mapping[case_id]
        assert set(entry) == {"image_path", "original_prompt", "editing_prompt", "editing_instruction",
                              "editing_type_id", "blended_word", "mask"}
        type_id = piebench.WORLD_KIND_TO_TYPE[case.kind]
        assert entry["editing_type_id"] == type_id and case_id.startswith(type_id)
        assert entry["image_path"] == f"{type_id}_{piebench.EDITING_TYPES[type_id]}/{case_id}.png"
        assert (fixture_dir / "annotation_images" / entry["image_path"]).is_file()
        assert entry["blended_word"] == " ".join(case.blend_words)
        assert entry["editing_instruction"].endswith(".")
    assert not [p for p in fixture_dir.parent.iterdir() if p.name.startswith(".pie.tmp")]  # temp folder renamed


def test_fixture_round_trips_through_the_loader(fixture_dir, world_cases):
    loaded = {c.case_id: c for c in piebench.load_pie_bench(fixture_dir, border=False)}
    bordered = {c.case_id: c for c in piebench.load_pie_bench(fixture_dir)}
    assert list(loaded) == sorted(loaded)
    for case_id, case in zip(piebench.fixture_ids(world_cases), world_cases):
        got = loaded[case_id]
        assert got.kind == piebench.EDITING_TYPES[piebench.WORLD_KIND_TO_TYPE[case.kind]]
        assert got.source.dtype == np.uint8 and got.source.shape == case.source.shape
        np.testing.assert_array_equal(got.source, case.source)
        assert got.source_prompt == case.source_prompt and got.target_prompt == case.target_prompt
        assert got.blend_words == case.blend_words and got.target is None
        np.testing.assert_array_equal(got.mask, case.mask)
        border_mask = bordered[case_id].mask
        assert border_mask[case.mask].all() and border_mask[0].all() and border_mask[:, -1].all()


def test_fixture_prompts_bracket_the_changed_word(fixture_dir, world_cases):
    mapping = json.loads((fixture_dir / "mapping_file.json").read_text())
    for case_id, case in zip(piebench.fixture_ids(world_cases), world_cases):
        entry = mapping[case_id]
        assert piebench.bracketed_words(entry["original_prompt"]) == [case.blend_words[0]]
        assert piebench.bracketed_words(entry["editing_prompt"]) == [case.blend_words[1]]
        assert piebench.strip_brackets(entry["original_prompt"]) == case.source_prompt


def test_default_fixture_has_n_per_kind_cases_of_each_kind(tmp_path):
    root = piebench.write_fixture(tmp_path / "d", n_per_kind=1)
    cases = piebench.load_pie_bench(root)
    assert sorted(c.kind for c in cases) == sorted(piebench.EDITING_TYPES[t]
                                                    for t in piebench.WORLD_KIND_TO_TYPE.values())


def test_kinds_filter_limit_and_resize(fixture_dir):
    colors = piebench.load_pie_bench(fixture_dir, kinds=["change_color"])
    assert len(colors) == 2 and {c.kind for c in colors} == {"change_color"}
    both = piebench.load_pie_bench(fixture_dir, kinds=("change_color", "change_background"))
    assert [c.kind for c in both] == ["change_color"] * 2 + ["change_background"] * 2  # sorted by id: 6..., 8...
    assert piebench.load_pie_bench(fixture_dir, kinds="change_style") == []
    first = piebench.load_pie_bench(fixture_dir, limit=3)
    assert [c.case_id for c in first] == sorted(c.case_id for c in piebench.load_pie_bench(fixture_dir))[:3]
    assert piebench.load_pie_bench(fixture_dir, kinds=["change_background"], limit=1)[0].kind == "change_background"
    small = piebench.load_pie_bench(fixture_dir, image_size=32, limit=1)[0]
    assert small.source.shape == (32, 32, 3) and small.mask.shape == (32, 32) and small.mask.dtype == bool


def test_non_rgb_images_are_converted(fixture_dir):
    entry = json.loads((fixture_dir / "mapping_file.json").read_text())["600000000000"]
    path = fixture_dir / "annotation_images" / entry["image_path"]
    Image.open(path).convert("L").save(path)
    case = piebench.load_pie_bench(fixture_dir, kinds=["change_color"], limit=1)[0]
    assert case.source.shape[-1] == 3 and case.source.dtype == np.uint8


# ----------------------------------------------------------------------------------------------- errors


def _edit_mapping(root, fn):
    path = root / "mapping_file.json"
    mapping = json.loads(path.read_text())
    fn(mapping)
    path.write_text(json.dumps(mapping))


def test_missing_folder_mapping_file_or_images_dir(tmp_path, fixture_dir):
    with pytest.raises(PieBenchError, match="not found"):
        piebench.load_pie_bench(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PieBenchError, match="missing mapping_file.json"):
        piebench.load_pie_bench(tmp_path / "empty")
    (tmp_path / "empty" / "mapping_file.json").write_text("{}")
    with pytest.raises(PieBenchError, match="missing annotation_images"):
        piebench.load_pie_bench(tmp_path / "empty")


def test_bad_json(fixture_dir):
    (fixture_dir / "mapping_file.json").write_text("{not json")
    with pytest.raises(PieBenchError, match="not valid JSON") as err:
        piebench.load_pie_bench(fixture_dir)
    assert "\n" not in str(err.value)


def test_missing_key_names_the_entry(fixture_dir):
    _edit_mapping(fixture_dir, lambda m: m["100000000000"].pop("editing_prompt"))
    with pytest.raises(PieBenchError, match=r"'100000000000' lacks key\(s\) editing_prompt"):
        piebench.load_pie_bench(fixture_dir)


def test_bad_editing_type(fixture_dir):
    _edit_mapping(fixture_dir, lambda m: m["100000000000"].update(editing_type_id="12"))
    with pytest.raises(PieBenchError, match="editing_type_id '12'"):
        piebench.load_pie_bench(fixture_dir)


def test_missing_image_names_the_entry_and_file(fixture_dir):
    entry = json.loads((fixture_dir / "mapping_file.json").read_text())["800000000001"]
    (fixture_dir / "annotation_images" / entry["image_path"]).unlink()
    with pytest.raises(PieBenchError, match=r"'800000000001': image not found: .*800000000001\.png"):
        piebench.load_pie_bench(fixture_dir)
    assert len(piebench.load_pie_bench(fixture_dir, kinds=["change_color"])) == 2  # only kept cases read images


def test_image_path_outside_the_images_folder(fixture_dir):
    _edit_mapping(fixture_dir, lambda m: m["100000000000"].update(image_path="../mapping_file.json"))
    with pytest.raises(PieBenchError, match="leaves annotation_images"):
        piebench.load_pie_bench(fixture_dir)


def test_corrupt_image(fixture_dir):
    entry = json.loads((fixture_dir / "mapping_file.json").read_text())["100000000000"]
    (fixture_dir / "annotation_images" / entry["image_path"]).write_bytes(b"not a png")
    with pytest.raises(PieBenchError, match="'100000000000': cannot read image"):
        piebench.load_pie_bench(fixture_dir)


def test_rle_out_of_range_names_the_entry(fixture_dir):
    _edit_mapping(fixture_dir, lambda m: m["400000000000"].update(mask=[0, 3, 64 * 64, 2]))
    with pytest.raises(PieBenchError, match=r"'400000000000': mask RLE start 4096 .* outside 0\.\.4095"):
        piebench.load_pie_bench(fixture_dir)


def test_unknown_kind_lists_the_valid_ones(fixture_dir):
    with pytest.raises(PieBenchError, match="unknown PIE-Bench kind.*color.*choose from random, change_object"):
        piebench.load_pie_bench(fixture_dir, kinds=["color"])


def test_bad_arguments(fixture_dir):
    with pytest.raises(PieBenchError, match="limit"):
        piebench.load_pie_bench(fixture_dir, limit=-1)
    with pytest.raises(PieBenchError, match="image_size"):
        piebench.load_pie_bench(fixture_dir, image_size=0)


def test_write_fixture_refuses_a_non_empty_folder(tmp_path, world_cases):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(PieBenchError, match="non-empty folder"):
        piebench.write_fixture(tmp_path / "busy", world_cases[:1])
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    (tmp_path / "free").mkdir()  # an empty folder is fine
    assert piebench.load_pie_bench(piebench.write_fixture(tmp_path / "free", world_cases[:1]))
    with pytest.raises(PieBenchError, match="no PIE-Bench editing type"):
        piebench.write_fixture(tmp_path / "odd", [dataclasses.replace(world_cases[0], kind="weird")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "free"]  # nothing left behind
