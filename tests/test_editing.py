import numpy as np
import pytest
import torch

from icd import world
from icd.editing.attention import controlled, layer_infos
from icd.editing.controllers import Controller, MasaCtrlControls, P2PControls, PromptToPrompt
from icd.editing.edit import EditControls
from icd.editing.inversion import Inversion
from icd.models.base import PromptError
from icd.pipeline import Pipeline


@pytest.fixture(scope="module")
def editor(random_icd_dir):
    return Pipeline.from_pretrained(random_icd_dir)


def _case(seed=7, kind="color"):
    return world.make_case(kind, world.EVAL_SEED_START + seed)


def test_controlled_processors_without_control_match_diffusers(editor):
    model = editor.model
    x = torch.randn(3, 4, 16, 16)
    cond = model.encode_prompt(["a small red star on a black background"] * 3)
    eps = model.eps_fn()
    ref = eps(x, 500, cond)
    with controlled(model.unet, Controller([0, 0], 4)):
        got = eps(x, 500, cond)
    assert torch.allclose(ref, got, atol=1e-5)
    assert not any(type(p).__name__ == "ControlledAttnProcessor" for p in model.unet.attn_processors.values())


def test_a_cross_attention_mask_is_sized_by_the_key_length_as_diffusers_does(editor):
    """A text mask [B, 77] (keys) on a 64-token (8 x 8) layer: the controlled processors apply it as diffusers' own
    (sizing it by the query length padded it to 77 + 64 columns and failed)."""
    model = editor.model
    x = torch.randn(2, 4, 16, 16)
    cond = model.encode_prompt(["a small red star on a black background"] * 2)
    mask = torch.ones(2, cond.tokens.shape[1])
    mask[:, 9:] = 0  # the padding after the prompt's tokens
    t = torch.tensor([500, 500])

    def call():
        return model.unet(x, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=mask).sample

    ref = call()
    with controlled(model.unet, Controller([0], 4)):
        got = call()
    assert torch.allclose(ref, got, atol=1e-5)
    assert (ref - model.unet(x, t, encoder_hidden_states=cond.tokens).sample).abs().max() > 1e-4  # the mask acts


def test_layer_infos_count_blocks_in_unet_order(editor):
    infos = layer_infos(editor.model.unet)
    places = [i.place for i in sorted(infos.values(), key=lambda i: i.index)]
    assert places == sorted(places, key=["down", "mid", "up"].index)
    assert {i.is_cross for i in infos.values()} == {True, False}


@pytest.mark.parametrize("method", ["icd", "ddim"])
def test_identical_prompts_give_the_reconstruction(editor, method):
    case = _case()
    inv = editor.invert(case.source[None], [case.source_prompt], method=method, steps=None if method == "icd" else 5)
    out = editor.edit(inv, [case.source_prompt], EditControls(guidance=0.0))
    np.testing.assert_array_equal(out.images, out.reconstructions)


def test_nfe_is_counted(editor):
    case = _case()
    model = editor.model
    model.counter.reset()
    inv = editor.invert(case.source[None], [case.source_prompt])
    assert model.counter.calls == 4
    out = editor.edit(inv, [[case.target_prompt, case.source_prompt]])
    assert out.nfe == 4 and out.images.shape == (2, 64, 64, 3) and model.counter.batch_sizes[-1] == 3
    inv = editor.invert(case.source[None], [case.source_prompt], method="ddim", steps=50)
    out = editor.edit(inv, [case.target_prompt])
    assert out.nfe == 50 and model.counter.batch_sizes[-1] == 4  # [uncond src, uncond tgt, src, tgt]


def test_saved_inversion_gives_the_same_edit(editor, tmp_path):
    case = _case(kind="shape")
    inv = editor.invert(case.source[None], [case.source_prompt])
    fresh = editor.edit(inv, [case.target_prompt])
    inv.save(tmp_path / "inv")
    again = editor.edit(Inversion.load(tmp_path / "inv.json"), [case.target_prompt])
    np.testing.assert_array_equal(fresh.images, again.images)
    repeat = editor.invert(case.source[None], [case.source_prompt])  # deterministic inversion
    assert torch.equal(repeat.noise, inv.noise)


def test_unequal_prompts_refine_and_bad_words_fail(editor):
    model = editor.model
    p2p = PromptToPrompt(model.tokenizer, ["a red star on a black background"],
                         ["a large red star on a black background", "a blue star on a black background"],
                         [0, 0], num_steps=4, controls=P2PControls(), latent_shape=(16, 16))
    assert p2p.modes == ["refine", "replace"]
    case = _case()
    inv = editor.invert(case.source[None], [case.source_prompt])
    with pytest.raises(PromptError, match="zebra"):
        editor.edit(inv, ["a red zebra on a black background"])
    with pytest.raises(ValueError, match="blend word"):
        editor.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls(blend_words=(("lion",), ("star",)))))


def test_only_controlled_layers_materialise_attention(editor, monkeypatch):
    model = editor.model
    seen = []

    class Spy(PromptToPrompt):  # controlled layers mix rows under SDPA; no probabilities without a local blend
        def attend(self, query, key, value, *, mask, scale, info, tokens):
            if self.cross_control(info, tokens) or self.self_injection(info, tokens):
                seen.append((self.step, info.is_cross))
            return super().attend(query, key, value, mask=mask, scale=scale, info=info, tokens=tokens)

        def attention(self, probs, info, tokens):
            raise AssertionError("attention probabilities materialised without a local blend")

    case = _case()
    controls = P2PControls(cross_replace=0.3, self_replace=0.6)  # cross on step 0, self on steps 0-1 (4 steps)
    spy = Spy(model.tokenizer, [case.source_prompt], [case.target_prompt], [0], num_steps=4, controls=controls,
              latent_shape=(16, 16))
    inv = editor.invert(case.source[None], [case.source_prompt])
    target = "icd.methods.base.make_controller"  # where the edit makes its controller
    monkeypatch.setattr(target, lambda *a, **k: spy)
    editor.edit(inv, [case.target_prompt], EditControls(p2p=controls))
    assert {s for s, cross in seen if cross} == {0} and {s for s, cross in seen if not cross} == {0, 1}


def test_masactrl_leaves_the_source_branch_alone(editor):
    case = _case(kind="size")
    inv = editor.invert(case.source[None], [case.source_prompt])
    plain = editor.edit(inv, [case.target_prompt], EditControls(p2p=None))
    masa = editor.edit(inv, [case.target_prompt], EditControls(p2p=None, masactrl=MasaCtrlControls(start_t=999)))
    np.testing.assert_array_equal(plain.reconstructions, masa.reconstructions)
    assert not np.array_equal(plain.images, masa.images)


def test_npi_and_nti_run_on_the_original_unet(editor):
    case = _case()
    for method in ("npi", "nti"):
        inv = editor.invert(case.source[None], [case.source_prompt], method=method, steps=3)
        out = editor.edit(inv, [case.target_prompt], EditControls(guidance=2.0))
        assert out.nfe == 3 and np.isfinite(out.images).all()
    assert len(inv.null_embeddings) == 3


def test_null_text_batch_equals_one_by_one(editor):
    from icd.editing.nulltext import null_text_optimize
    from icd.samplers import ddim_invert

    model = editor.base()
    cases = [_case(seed=s) for s in (1, 2)]
    z0 = model.encode_images(np.stack([c.source for c in cases]))
    cond = model.encode_prompt([c.source_prompt for c in cases])

    def invert(rows):
        timesteps, latents = ddim_invert(model.eps_fn(), z0[rows], cond.index(rows), steps=3,
                                         schedule=model.schedule)
        return Inversion(latents=latents, timesteps=timesteps, prompts=[cases[k].source_prompt for k in rows],
                         method="nti")

    both = null_text_optimize(model, invert([0, 1]), cond, guidance=2.0)
    empty = model.encode_prompt([""]).tokens[0]
    for k in range(2):
        single = null_text_optimize(model, invert([k]), cond.index([k]), guidance=2.0)
        diffs = [float((a[k] - b[0]).abs().mean()) for a, b in zip(both, single)]
        moved = [float((b[0] - empty).abs().mean()) for b in single]
        # equal up to Adam's sign-like first steps on near-zero gradients (batched convolutions round differently)
        assert all(d < 0.01 * m for d, m in zip(diffs, moved))


def test_p2p_on_the_shipped_model_keeps_the_background_and_reaches_the_target():
    """World cases on the embedded model: pixels outside the ground-truth mask stay close to the source."""
    from icd.metrics import psnr

    editor = Pipeline.from_pretrained()
    cases = [world.make_case("color", world.EVAL_SEED_START + 700_000 + i) for i in range(6)]
    inv = editor.invert(np.stack([c.source for c in cases]), [c.source_prompt for c in cases])
    old, new = zip(*(c.blend_words for c in cases))
    results = [editor.edit(Inversion(latents=[x[i:i + 1] for x in inv.latents], timesteps=inv.timesteps,
                                     prompts=[c.source_prompt], method="icd"), [c.target_prompt],
                           EditControls(p2p=P2PControls(blend_words=((o,), (n,)))))
               for i, (c, o, n) in enumerate(zip(cases, old, new))]
    edited = np.concatenate([r.images for r in results])
    src, tgt = np.stack([c.source for c in cases]), np.stack([c.target for c in cases])
    outside = ~np.stack([c.mask for c in cases])
    assert psnr(src, edited, outside).mean() > 25.0  # background preserved
    assert psnr(tgt, edited).mean() > psnr(src, edited).mean()  # closer to the rendered target than to the source


def test_blend_words_per_target(editor):
    model = editor.model
    sources = ["a red star on a black background", "a blue circle on a gray background"]
    targets = ["a green star on a black background", "a blue square on a gray background"]
    p2p = PromptToPrompt(model.tokenizer, sources, targets, [0, 1], num_steps=4,
                         controls=P2PControls(blend_words=[(("red",), ("green",)), (("circle",), ("square",))]),
                         latent_shape=(16, 16))
    src_v, tgt_v = p2p.blend
    assert src_v[0, 2] == 1 and tgt_v[0, 2] == 1 and src_v[1, 3] == 1 and tgt_v[1, 3] == 1
    with pytest.raises(ValueError, match="blend-word pairs"):
        PromptToPrompt(model.tokenizer, sources, targets, [0, 1], num_steps=4,
                       controls=P2PControls(blend_words=[(("red",), ("green",))]), latent_shape=(16, 16))
