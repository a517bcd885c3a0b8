"""The Python API's input layer (issue 34): every bad argument is a ValueError / TypeError naming it, valid inputs
compute what they did before, and a run whose `should_stop()` turns True stops with `Cancelled`."""

import numpy as np
import pytest

from icd import world
from icd.editing.edit import EditControls
from icd.pipeline import Pipeline
from icd.samplers import Cancelled


@pytest.fixture(scope="module")
def pipe(random_icd_dir):
    return Pipeline.from_pretrained(random_icd_dir)


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 7)


def stop_after(k: int):
    """A should_stop that returns False k times, then True; `.calls` counts the questions."""
    def should_stop():
        should_stop.calls += 1
        return should_stop.calls > k
    should_stop.calls = 0
    return should_stop


# ------------------------------------------------------------------------------------------------ cancellation
@pytest.mark.parametrize("k", [0, 2])
def test_edit_stops_with_cancelled_after_k_steps(pipe, case, k):
    inv = pipe.invert(case.source[None], [case.source_prompt])
    model = pipe.model
    before = model.counter.calls
    stop = stop_after(k)
    with pytest.raises(Cancelled):
        pipe.edit(inv, [case.target_prompt], should_stop=stop)
    assert stop.calls == k + 1 and model.counter.calls - before == k  # k reverse jumps ran, the (k+1)-th did not


def test_should_stop_never_true_changes_nothing(pipe, case):
    inv = pipe.invert(case.source[None], [case.source_prompt])
    plain = pipe.edit(inv, [case.target_prompt])
    stop = stop_after(10**6)
    asked = pipe.edit(pipe.invert(case.source[None], [case.source_prompt], should_stop=stop), [case.target_prompt],
                      should_stop=stop)
    np.testing.assert_array_equal(plain.images, asked.images)
    assert stop.calls == 8  # 4 forward + 4 reverse jumps: asked once per step


@pytest.mark.parametrize("method", ["icd", "ddim", "nti"])
def test_invert_and_reconstruct_stop(pipe, case, method):
    steps = None if method == "icd" else 3
    with pytest.raises(Cancelled):
        pipe.invert(case.source[None], [case.source_prompt], method=method, steps=steps, should_stop=stop_after(1))
    with pytest.raises(Cancelled):
        pipe.reconstruct(case.source[None], [case.source_prompt], method=method, steps=steps,
                         should_stop=stop_after(3 if method != "nti" else 5))


def test_nti_optimisation_stops(pipe, case):
    stop = stop_after(4)  # 3 DDIM inversion steps, then the first Adam iteration of null-text is asked
    with pytest.raises(Cancelled):
        pipe.invert(case.source[None], [case.source_prompt], method="nti", steps=3, should_stop=stop)
    assert stop.calls == 5


def test_generate_stops(pipe):
    with pytest.raises(Cancelled):
        pipe.generate(["a small blue star on a white background"], should_stop=stop_after(1))


def test_cancelled_is_not_a_value_error():
    assert issubclass(Cancelled, Exception) and not issubclass(Cancelled, ValueError)


def test_edit_controls_still_positional(pipe, case):
    inv = pipe.invert(case.source[None], [case.source_prompt])
    out = pipe.edit(inv, [case.source_prompt], EditControls(guidance=0.0))
    np.testing.assert_array_equal(out.images, out.reconstructions)


# ------------------------------------------------------------------------------------------------ images
def _err(exc, *words):
    """pytest.raises for `exc` whose message holds every word."""
    import re
    return pytest.raises(exc, match="(?s)" + "".join(f"(?=.*{re.escape(w)})" for w in words))


def _inv(pipe, images, prompts, **kw):
    return pipe.invert(images, prompts, **kw)


@pytest.fixture(scope="module")
def reference(pipe, case):
    """The inversion of the case's uint8 [1, H, W, 3] array: every accepted form must give exactly this."""
    return pipe.invert(case.source[None], [case.source_prompt])


def test_accepted_image_forms_give_the_same_inversion(pipe, case, reference):
    import torch
    from PIL import Image

    src = case.source
    forms = {
        "HxWx3 array": src,
        "PIL image": Image.fromarray(src),
        "list of arrays": [src],
        "list of PIL": [Image.fromarray(src)],
        "tuple": (src,),
        "uint8 NHWC tensor": torch.from_numpy(src[None].copy()),
        "uint8 NCHW tensor": torch.from_numpy(src[None].copy()).permute(0, 3, 1, 2),
        "uint8 CHW tensor": torch.from_numpy(src.copy()).permute(2, 0, 1),
        "int64 array in 0..255": src.astype(np.int64)[None],
        "opaque RGBA array": np.concatenate([src, np.full(src.shape[:2] + (1,), 255, np.uint8)], -1),
        "opaque RGBA PIL": Image.fromarray(src).convert("RGBA"),
        "float tensor (-1, 1)": (torch.from_numpy(src[None].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0,
                                 (-1, 1)),
    }
    for name, form in forms.items():
        images, value_range = form if isinstance(form, tuple) and len(form) == 2 and not isinstance(
            form[0], np.ndarray) else (form, None)
        inv = pipe.invert(images, case.source_prompt, value_range=value_range)
        assert torch.equal(inv.noise, reference.noise), name


def test_float_in_0_1_with_its_range_matches_uint8(pipe, case, reference):
    inv = pipe.invert(case.source[None] / 255.0, [case.source_prompt], value_range=(0, 1))
    assert float((inv.noise - reference.noise).abs().max()) < 1e-4


def test_grey_and_rgba_are_converted_as_the_cli_reader_does(pipe, case):
    from PIL import Image

    from icd.imageio import to_rgb
    from icd.inputs import as_images

    grey = case.source[..., 0]
    np.testing.assert_array_equal(as_images(grey)[0], np.asarray(to_rgb(Image.fromarray(grey))))
    rgba = np.concatenate([case.source, np.full(case.source.shape[:2] + (1,), 100, np.uint8)], -1)
    np.testing.assert_array_equal(as_images(rgba)[0], np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))))
    assert pipe.invert(Image.fromarray(rgba, "RGBA"), case.source_prompt).noise.shape[0] == 1


@pytest.mark.parametrize("name, images, kw, exc, words", [
    ("float [0, 1] array", lambda s: s[None] / 255.0, {}, TypeError, ("images", "float64", "value_range")),
    ("float32 array", lambda s: s[None].astype(np.float32), {}, TypeError, ("images", "uint8")),
    ("uint16 array", lambda s: s[None].astype(np.uint16) * 257, {}, TypeError, ("images", "uint16", "uint8")),
    ("uint16 in 0..255", lambda s: s[None].astype(np.uint16), {}, TypeError, ("images", "uint16")),
    ("out-of-range int64", lambda s: s[None].astype(np.int64) * 4, {}, ValueError, ("images", "0..255")),
    ("negative int64", lambda s: s[None].astype(np.int64) - 300, {}, ValueError, ("images", "0..255")),
    ("bool array", lambda s: s[None] > 127, {}, TypeError, ("images", "bool")),
    ("grey [1, 64, 64] array", lambda s: s[None, ..., 0], {}, ValueError, ("images", "(1, 64, 64)", "channels")),
    ("NCHW numpy array", lambda s: s[None].transpose(0, 3, 1, 2), {}, ValueError, ("images", "channels first")),
    ("empty batch", lambda s: s[:0][None][:0], {}, ValueError, ("images", "empty")),
    ("empty list", lambda s: [], {}, ValueError, ("images", "empty")),
    ("zero-width image", lambda s: s[:, :0], {}, ValueError, ("images", "empty")),
    ("5-D array", lambda s: s[None, None], {}, ValueError, ("images", "shape")),
    ("list of batches", lambda s: [s[None]], {}, ValueError, ("images[0]", "one image")),
    ("list of mixed sizes", lambda s: [s, s[:32]], {}, ValueError, ("images[1]", "one size")),
    ("list with None", lambda s: [s, None], {}, TypeError, ("images[1]", "NoneType")),
    ("a path", lambda s: "cat.png", {}, TypeError, ("images", "path", "load_image")),
    ("a number", lambda s: 3, {}, TypeError, ("images", "int")),
    ("float tensor, no range", lambda s: __import__("torch").rand(1, 3, 64, 64), {}, TypeError,
     ("images", "value_range")),
    ("float out of its range", lambda s: s[None] / 100.0, {"value_range": (0, 1)}, ValueError,
     ("images", "[0, 1]")),
    ("NaN floats", lambda s: np.full((1, 64, 64, 3), np.nan), {"value_range": (0, 1)}, ValueError,
     ("images", "NaN")),
    ("a bad value_range", lambda s: s[None] / 255.0, {"value_range": (0, 255)}, ValueError, ("value_range",)),
    ("value_range on uint8", lambda s: s[None], {"value_range": (0, 1)}, ValueError, ("value_range", "uint8")),
])
def test_bad_images_are_refused_naming_images(pipe, case, name, images, kw, exc, words):
    model = pipe.model
    before = model.counter.calls
    with _err(exc, *words):
        pipe.invert(images(case.source), [case.source_prompt], **kw)
    with _err(exc, *words):
        pipe.reconstruct(images(case.source), [case.source_prompt], **kw)
    assert model.counter.calls == before  # refused before any network call


# ------------------------------------------------------------------------------------------------ prompts, seeds
def test_a_bare_string_is_one_prompt(pipe, case, reference):
    import torch

    assert torch.equal(pipe.invert(case.source[None], case.source_prompt).noise, reference.noise)
    out = pipe.generate("a small blue star on a white background")
    assert out.images.shape[0] == 1


@pytest.mark.parametrize("prompts, exc, words", [
    ([None], TypeError, ("prompts[0]", "string", "NoneType")),
    ([["a red star on a black background"]], TypeError, ("prompts[0]", "list")),
    ([], ValueError, ("prompts", "empty")),
    (None, TypeError, ("prompts", "NoneType")),
    (7, TypeError, ("prompts", "int")),
    (b"a red star", TypeError, ("prompts", "bytes")),
])
def test_bad_prompts_are_refused_naming_prompts(pipe, case, prompts, exc, words):
    with _err(exc, *words):
        pipe.invert(case.source[None], prompts)
    with _err(exc, *words):
        pipe.generate(prompts)


def test_prompt_count_must_match_the_images(pipe, case):
    with _err(ValueError, "1 images", "2 prompts"):
        pipe.invert(case.source[None], [case.source_prompt] * 2)


@pytest.mark.parametrize("seed, exc, words", [
    (2**70, ValueError, ("seed", "2**64 - 1")),
    (-1, ValueError, ("seed",)),
    ("x", TypeError, ("seed", "str")),
    (1.5, TypeError, ("seed", "float")),
    (True, TypeError, ("seed", "bool")),
    (None, TypeError, ("seed", "NoneType")),
])
def test_bad_seeds_are_refused_naming_seed(pipe, case, seed, exc, words):
    with _err(exc, *words):
        pipe.invert(case.source[None], [case.source_prompt], seed=seed)
    with _err(exc, *words):
        pipe.generate(["a small blue star on a white background"], seed=seed)


def test_the_largest_seeds_run_and_numpy_seeds_are_ints(pipe, case):
    inv = pipe.invert(case.source[None], [case.source_prompt], seed=2**64 - 1)
    assert inv.settings["seed"] == 2**64 - 1
    inv = pipe.invert(case.source[None], [case.source_prompt], seed=np.int64(5))
    assert type(inv.settings["seed"]) is int
    with _err(ValueError, "seed", "2**64 - 1"):  # seed + 1 for the second image passes the range
        pipe.generate(["a red star on a black background"] * 2, seed=2**64 - 1)


@pytest.mark.parametrize("kw, exc, words", [
    ({"batch_size": 0}, ValueError, ("batch_size", ">= 1")),
    ({"batch_size": -3}, ValueError, ("batch_size",)),
    ({"batch_size": 2.0}, TypeError, ("batch_size", "float")),
])
def test_bad_batch_size_is_refused(pipe, kw, exc, words):
    with _err(exc, *words):
        pipe.generate(["a small blue star on a white background"], **kw)


# ------------------------------------------------------------------------------------------------ edit arguments
@pytest.mark.parametrize("targets, exc, words", [
    ([[]], ValueError, ("target_prompts[0]", "empty")),
    ([None], TypeError, ("target_prompts[0]", "NoneType")),
    ([[None]], TypeError, ("target_prompts[0][0]", "NoneType")),
    ([], ValueError, ("target_prompts", "empty")),
    (None, TypeError, ("target_prompts", "NoneType")),
    (3, TypeError, ("target_prompts", "int")),
])
def test_bad_targets_are_refused_naming_them(pipe, reference, targets, exc, words):
    with _err(exc, *words):
        pipe.edit(reference, targets)


def test_a_string_for_controls_or_inversion_is_refused(pipe, case, reference, tmp_path):
    with _err(TypeError, "controls", "EditControls", "str"):
        pipe.edit(reference, [case.target_prompt], "p2p")
    with _err(TypeError, "inversion", "Inversion.load", "str"):
        pipe.edit(str(tmp_path / "inv.json"), [case.target_prompt])
    with _err(TypeError, "inversion", "dict"):
        pipe.check_inversion({"method": "icd"})


@pytest.mark.parametrize("blend, exc, words", [
    (("red",), ValueError, ("blend_words", "pair")),
    ((("red",),), ValueError, ("blend_words", "pair")),
    (("red", "blue"), TypeError, ("blend_words", "source words", "'red'")),
    (((), ()), ValueError, ("blend_words", "no word")),
    ((("red",), (None,)), TypeError, ("blend_words", "target words")),
    ([(("red",), ("blue",))] * 2, ValueError, ("blend_words", "2", "1 target")),
    ((("zebra",), ("blue",)), ValueError, ("zebra",)),
])
def test_bad_blend_words_are_refused_naming_them(pipe, case, reference, blend, exc, words):
    from icd.editing.controllers import P2PControls

    before = pipe.model.counter.calls
    with _err(exc, *words):
        pipe.edit(reference, [case.target_prompt], EditControls(p2p=P2PControls(blend_words=blend)))
    assert pipe.model.counter.calls == before


def test_blend_words_on_one_side_run_as_the_web_page_splits_them(pipe, case, reference):
    """A word in one prompt only is a one-sided pair, as `icd.web.engine.blend_words` makes it."""
    from icd.editing.controllers import P2PControls

    old, new = case.blend_words
    for blend in (((old,), ()), ((), (new,)), ((old,), (new,))):
        out = pipe.edit(reference, [case.target_prompt], EditControls(p2p=P2PControls(blend_words=blend)))
        assert out.images.shape == (1, 64, 64, 3)


# ------------------------------------------------------------------------------------------------ saving
@pytest.mark.parametrize("path, exc, words", [
    ("", ValueError, ("path", "names no file")),
    (".", ValueError, ("path", "names no file")),
    ("..", ValueError, ("path", "names no file")),
    ("/proc/x", ValueError, ("path", "/proc")),
    ("x" * 300, ValueError, ("path", "bytes")),
    (None, TypeError, ("path", "NoneType")),
])
def test_bad_save_paths_are_refused_before_writing(reference, path, exc, words):
    with _err(exc, *words):
        reference.save(path)


def test_save_onto_a_device_node_is_refused(reference, tmp_path):
    (tmp_path / "dev.json").symlink_to("/dev/null")
    with _err(ValueError, "path", "device"):
        reference.save(tmp_path / "dev")
    assert not (tmp_path / "dev.safetensors").exists()  # nothing written


def test_save_into_a_folder_or_a_directory_in_place_is_refused(reference, tmp_path):
    with _err(ValueError, "path", "names no file"):
        reference.save(str(tmp_path) + "/")
    (tmp_path / "taken.json").mkdir()
    with _err(ValueError, "path", "directory"):
        reference.save(tmp_path / "taken")
    assert not (tmp_path / "taken.safetensors").exists()  # nothing written


def test_save_keeps_dotted_names_and_loads_back(reference, tmp_path):
    from icd.editing.inversion import Inversion

    out = reference.save(tmp_path / "run.v1")
    assert out == tmp_path / "run.v1.json" and (tmp_path / "run.v1.safetensors").is_file()
    for name in ("run.v1", "run.v1.json", "run.v1.safetensors"):
        again = Inversion.load(tmp_path / name)
        assert again.model_record == reference.model_record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.v1.json", "run.v1.safetensors"]  # no temp left


# ------------------------------------------------------------------------------------------------ the model record
def test_an_inversion_records_its_model(pipe, reference):
    record = reference.model_record
    assert record["family"] == pipe.model.family and record["image_size"] == 64
    assert len(record["weights"]) == 16 and int(record["weights"], 16) >= 0


def test_an_inversion_from_another_model_is_refused(pipe, case):
    """The embedded model's inversion on this random model of the same architecture and size: the latents fit (the
    old checks passed it), the weights differ: refused naming them, before any network call."""
    from icd.editing.inversion import InversionError

    inv = Pipeline.from_pretrained().invert(case.source[None], [case.source_prompt])
    assert inv.noise.shape == pipe.invert(case.source[None], [case.source_prompt]).noise.shape
    before = pipe.model.counter.calls
    with _err(InversionError, "another model", "embedded", "weights", inv.model_record["weights"]):
        pipe.edit(inv, [case.target_prompt])
    assert pipe.model.counter.calls == before


@pytest.mark.parametrize("key, value, words", [
    ("family", "sdxl", ("model family", "sdxl")),
    ("image_size", 512, ("native image size", "512")),
    ("weights", "0123456789abcdef", ("weights", "0123456789abcdef")),
])
def test_a_saved_foreign_record_is_refused_naming_what_differs(pipe, case, reference, tmp_path, key, value, words):
    import json

    from icd.editing.inversion import Inversion, InversionError

    out = reference.save(tmp_path / "inv")
    meta = json.loads(out.read_text())
    meta["model_record"][key] = value
    out.write_text(json.dumps(meta))
    with _err(InversionError, *words):
        pipe.edit(Inversion.load(out), [case.target_prompt])


def test_an_old_inversion_without_a_record_still_edits(pipe, case, reference, tmp_path):
    import json

    from icd.editing.inversion import Inversion

    out = reference.save(tmp_path / "old")
    meta = json.loads(out.read_text())
    del meta["model_record"]
    out.write_text(json.dumps(meta))
    old = Inversion.load(out)
    assert old.model_record is None
    np.testing.assert_array_equal(pipe.edit(old, [case.target_prompt]).images,
                                  pipe.edit(reference, [case.target_prompt]).images)


def test_a_malformed_record_is_an_inversion_error(reference, tmp_path):
    import json

    from icd.editing.inversion import Inversion, InversionError

    out = reference.save(tmp_path / "bad")
    meta = json.loads(out.read_text())
    meta["model_record"] = {"family": "sd15", "image_size": "64", "weights": 3}
    out.write_text(json.dumps(meta))
    with _err(InversionError, "malformed model_record"):
        Inversion.load(out)


def test_the_fingerprint_is_the_same_fused_or_not_and_computed_once(random_icd_dir, reference, monkeypatch):
    from icd.editing import inversion as inversion_module

    unfused = Pipeline.from_pretrained(random_icd_dir, fuse=False)
    calls = []
    real = inversion_module.weights_fingerprint
    monkeypatch.setattr(inversion_module, "weights_fingerprint", lambda *a, **k: calls.append(1) or real(*a, **k))
    case = world.make_case("color", world.EVAL_SEED_START + 7)
    for _ in range(3):
        inv = unfused.invert(case.source[None], [case.source_prompt])
    assert inv.model_record == reference.model_record and len(calls) == 1
    unfused.edit(reference, [case.target_prompt])  # made on the fused pipeline: accepted
    assert len(calls) == 1


def test_the_fingerprint_sees_a_changed_adapter_but_gddim_ignores_adapters(random_icd_dir):
    import torch

    from icd.editing.inversion import weights_fingerprint

    model = Pipeline.from_pretrained(random_icd_dir, fuse=False).model
    with_adapters, without = weights_fingerprint(model, adapters=True), weights_fingerprint(model, adapters=False)
    lora_param = next(p for n, p in model.unet.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_param.view(-1)[0] += 1.0
    assert weights_fingerprint(model, adapters=True) != with_adapters
    assert weights_fingerprint(model, adapters=False) == without


@pytest.mark.parametrize("family, words", [("sd15", ("native image size is 64", "128")),
                                           ("sdxl", ("model family is sd15", "sdxl"))])
def test_an_embedded_inversion_is_refused_by_a_stable_diffusion_pipeline(tmp_path, case, family, words):
    """The issue's case: an inversion made with the embedded model decoded by an SD pipeline (which takes any
    photo size, so the latent shape passed): refused naming the family or the native size."""
    from icd.editing.inversion import Inversion, InversionError
    from icd.models.synthetic import write_pipeline

    f = write_pipeline(tmp_path / family, family, vocabulary=world.vocabulary(), image_size=128)
    sd = Pipeline.from_pretrained(f.pipeline, unet=f.unet, lora_forward=f.lora_forward, lora_reverse=f.lora_reverse)
    out = Pipeline.from_pretrained().invert(case.source[None], [case.source_prompt]).save(tmp_path / "inv")
    with _err(InversionError, "another model", *words):
        sd.edit(Inversion.load(out), [case.target_prompt])


def test_the_fingerprint_is_the_same_in_fp16_and_reads_large_tensors(pipe):
    """fp32 and fp16 loads of one checkpoint agree (the samples are rounded to fp16); a tensor over 2**24 elements
    (float positions would round past its end) is sampled at exact integer positions."""
    import copy
    from types import SimpleNamespace

    import torch

    from icd.editing.inversion import weights_fingerprint

    model = pipe.base()
    fp32 = SimpleNamespace(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, fused=None)
    fp16 = SimpleNamespace(**{k: copy.deepcopy(v).half() for k, v in vars(fp32).items() if k != "fused"}, fused=None)
    assert weights_fingerprint(fp16, adapters=False) == weights_fingerprint(fp32, adapters=False)
    big = SimpleNamespace(unet=torch.nn.Linear(2**12 + 1, 2**12, bias=False), fused=None)
    assert len(weights_fingerprint(big, adapters=False)) == 16
