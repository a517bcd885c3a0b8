"""Attention control on joint attention (icd.editing.joint_attention) on a tiny random FLUX pipeline: the processors
reproduce diffusers' without control, P2P's mixed joint map and MasaCtrl's mutual attention equal their explicit
(materialised) definitions, identical prompts decode the source, and `Pipeline.edit` runs P2P / MasaCtrl / swap and
always restores the processors."""

import types

import numpy as np
import pytest
import torch

from icd import world
from icd.editing import tokens as tok
from icd.editing.controllers import Controller, MasaCtrl, MasaCtrlControls, P2PControls, PromptToPrompt
from icd.editing.edit import EditControls, make_controller
from icd.editing.joint_attention import JointLayerInfo
from icd.models import flux_embedded as fe

SIZE = fe.FluxSize(1, 2, 2, 16, (4, 6, 6))  # 1 double-stream + 2 single-stream blocks, 2 heads x 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fe.build_random_pipeline(tmp_path_factory.mktemp("flux") / "pipe", vocabulary=world.vocabulary(),
                                    size=SIZE, seed=1)


@pytest.fixture(scope="module")
def pipe(folder):
    from icd.pipeline import Pipeline

    return Pipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def layers(pipe):
    return pipe.attention(pipe.model)


def _case(kind="color", seed=3):
    return world.make_case(kind, world.EVAL_SEED_START + seed)


def _inputs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, fe.IMAGE_TOKENS, fe.PACKED_CHANNELS, generator=g),
                encoder_hidden_states=torch.randn(batch, fe.TEXT_LENGTH, fe.T5_DIM, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.full((batch,), 0.7),
                txt_ids=torch.zeros(fe.TEXT_LENGTH, 3), img_ids=fe.image_ids(), return_dict=False)


def _default_processors(transformer):
    return {type(p).__name__ for p in transformer.attn_processors.values()}


def test_layers_follow_the_transformers_block_order(layers):
    infos = sorted(layers.infos.values(), key=lambda i: i.index)
    assert [(i.stream, i.block) for i in infos] == [("double", 0), ("single", 0), ("single", 1)]
    assert layers.mutual_start == 2 and all(i.text_length is None for i in infos)  # D + floor(S / 2)


def test_processors_without_control_are_diffusers_on_both_block_kinds(pipe, layers):
    """No control (no controller; a controller that controls nothing) = FluxAttnProcessor within 1e-5."""
    transformer = pipe.model.unet
    inputs = _inputs(2)
    with torch.no_grad():
        ref = transformer(**inputs)[0]
        for controller in (None, Controller([0], 4)):
            saved = layers.install(controller)
            try:
                assert _default_processors(transformer) == {"JointAttnProcessor"}
                got = transformer(**inputs)[0]
            finally:
                layers.restore(saved)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert _default_processors(transformer) == {"FluxAttnProcessor"} and not transformer._forward_pre_hooks


def _p2p(pipe, source, target, **controls):
    return PromptToPrompt(pipe.model.attention_tokenizer, [source], [target], [0], num_steps=4,
                          controls=P2PControls(**controls), latent_shape=(16, 16))


def _info(layers):
    return JointLayerInfo("x", "double", 0, 0, text_length=fe.TEXT_LENGTH)


def _reference_p2p(p2p, q, k, v, text, *, inject):
    """The mixed joint map of icd.editing.joint_attention's docstring, materialised, on rows [source, target]."""
    probs = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)  # [2, heads, L + N, L + N]
    p_src, p_tgt = probs[0, :, text:, :text], probs[1, :, text:, :text]
    m, keep, e = p2p.mappers[0, :text, :text], p2p.keep[0, :text], p2p.equalizer[0, :text]
    t = p_src @ m + p_tgt * keep
    rows = 0 if inject else 1
    image = ((q[rows, :, text:] @ k[rows, :, text:].transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
    mixed = torch.cat([t * e, (1 - t.sum(-1, keepdim=True)) * image], dim=-1)
    out = probs @ v
    out[1, :, text:] = mixed @ v[1]
    return out


@pytest.mark.parametrize("inject", [False, True])
def test_p2p_joint_map_is_its_written_definition(pipe, layers, inject):
    """Refine + reweight on random joint q, k, v: the fused computation equals the materialised mixed map."""
    case = _case()
    p2p = _p2p(pipe, case.source_prompt, "a large " + case.source_prompt.split(" ", 1)[1], reweight={"large": 2.5},
               cross_replace=1.0, self_replace=1.0 if inject else 0.0)
    assert p2p.modes == ["refine"] and p2p.cross_on and p2p.self_on == inject
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, fe.TEXT_LENGTH + fe.IMAGE_TOKENS, 16, generator=g) for _ in range(3))
    p2p.layout(2)
    got = p2p.attend_joint(q, k, v, mask=None, info=_info(layers))
    torch.testing.assert_close(got, _reference_p2p(p2p, q, k, v, fe.TEXT_LENGTH, inject=inject), atol=1e-5, rtol=0)


def test_mutual_attention_is_its_written_definition(layers):
    """Target image queries read [own text keys; source image keys]; text queries and the source row their own."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, fe.TEXT_LENGTH + fe.IMAGE_TOKENS, 16, generator=g) for _ in range(3))
    masa = MasaCtrl([0], 4, MasaCtrlControls(start_t=999), first_decoder_layer=0)
    masa.layout(2)
    got = masa.attend_joint(q, k, v, mask=None, info=_info(layers))
    text = fe.TEXT_LENGTH
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    k_mix, v_mix = torch.cat([k[1, :, :text], k[0, :, text:]], 1), torch.cat([v[1, :, :text], v[0, :, text:]], 1)
    ref[1, :, text:] = torch.nn.functional.scaled_dot_product_attention(q[1, :, text:], k_mix, v_mix)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("control", ["p2p", "masactrl"])
def test_identical_prompts_leave_the_target_equal_to_the_source(pipe, layers, control):
    """Transformer level, every block controlled at every step: rows [source, target] with the same inputs."""
    prompt = "a large red circle on a gray background"
    controller = _p2p(pipe, prompt, prompt, mode="replace", cross_replace=1.0, self_replace=1.0,
                      blend_words=(("red",), ("red",))) if control == "p2p" else \
        MasaCtrl([0], 4, MasaCtrlControls(start_t=999), first_decoder_layer=0)
    inputs = _inputs(1, seed=2)
    inputs = {n: x.expand(2, *x.shape[1:]) if n not in ("txt_ids", "img_ids") and torch.is_tensor(x) else x
              for n, x in inputs.items()}
    seen = []
    attend = type(controller).attend_joint

    def spy(self, query, key, value, *, mask, info):
        seen.append(info.stream)
        return attend(self, query, key, value, mask=mask, info=info)

    controller.attend_joint = types.MethodType(spy, controller)
    saved = layers.install(controller)
    try:
        with torch.no_grad():
            out = pipe.model.unet(**inputs)[0]
    finally:
        layers.restore(saved)
    assert seen == ["double", "single", "single"]
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=0)


def test_t5_positions_start_at_zero(pipe):
    t5 = pipe.model.attention_tokenizer
    assert tok.prefix(t5) == 0 and tok.word_spans(t5, "a red circle") == [range(0, 1), range(1, 2), range(2, 3)]
    m = tok.replace_mapper(t5, "a red circle on a gray background", "a blue circle on a gray background")
    assert torch.equal(m, torch.eye(t5.model_max_length))
    index, alpha = tok.refine_alignment(t5, "a red circle", "a large red circle")
    assert alpha[1] == 0 and index[2] == 1 and index[4] == 3 and alpha[0] == 1  # "large" new; "</s>" aligned
    p2p = _p2p(pipe, "a red circle on a gray background", "a blue circle on a gray background",
               blend_words=(("red",), ("blue",)))
    assert p2p.blend[0][0].nonzero().flatten().tolist() == [1] and p2p.equalizer[0, 1] == 4.0


def test_blocks_choose_the_controlled_layers(pipe, layers):
    case = _case()
    seen = set()

    class Spy(PromptToPrompt):
        def attend_joint(self, query, key, value, *, mask, info):
            if self.joint_control(info)[0]:
                seen.add(info.stream)
            return super().attend_joint(query, key, value, mask=mask, info=info)

    for blocks, streams in (("double", {"double"}), ("single", {"single"}), ((0, 2), {"double", "single"})):
        seen.clear()
        spy = Spy(pipe.model.attention_tokenizer, [case.source_prompt], [case.target_prompt], [0], num_steps=4,
                  controls=P2PControls(blocks=blocks), latent_shape=(16, 16))
        saved = layers.install(spy)
        try:
            with torch.no_grad():
                pipe.model.unet(**_inputs(2))
        finally:
            layers.restore(saved)
        assert seen == streams, blocks
    with pytest.raises(ValueError, match="blocks"):
        P2PControls(blocks="middle")
    with pytest.raises(ValueError, match="blocks"):
        P2PControls(blocks=(1, -1))
    unet_layers = types.SimpleNamespace(infos=layers.infos, mutual_start=5)  # no `joint`: a UNet's
    kwargs = dict(sources=[case.source_prompt], targets=[case.target_prompt], source_of=torch.tensor([0]),
                  num_steps=4)
    with pytest.raises(ValueError, match="UNet has none"):
        make_controller(pipe.model, unet_layers, controls=EditControls(p2p=P2PControls(blocks="double")), **kwargs)
    with pytest.raises(ValueError, match=r"0\.\.2 for this transformer"):
        make_controller(pipe.model, layers, controls=EditControls(p2p=P2PControls(blocks=(3,))), **kwargs)
    masa = make_controller(pipe.model, layers, controls=EditControls(p2p=None, masactrl=MasaCtrlControls()), **kwargs)
    assert masa.start_layer == layers.mutual_start == 2


def test_p2p_blocks_from_the_command_line(folder, tmp_path, capsys):
    """`icd edit --p2p-blocks`: names and indices choose the controlled blocks (different edits); a bad value, an
    index past the transformer's blocks or blocks on a UNet is a one-line error, exit 2."""
    from PIL import Image

    from icd.cli import main
    from icd.requests import parse_blocks

    assert parse_blocks(" Double ") == "double" and parse_blocks("2, 0 2") == (0, 2) and parse_blocks("") is None
    case = _case()
    src = tmp_path / "src.png"
    Image.fromarray(case.source).save(src)
    base = ["edit", str(src), "--source", case.source_prompt, "--target", case.target_prompt, "--method", "flow-ode",
            "--steps", "2", "--threads", "1"]
    outs = {}
    for spec in ("double", "single", "0"):
        out = tmp_path / f"{spec}.png"
        assert main([*base, "--model", str(folder), "--p2p-blocks", spec, "-o", str(out)]) == 0, capsys.readouterr()
        outs[spec] = np.asarray(Image.open(out))
    assert not np.array_equal(outs["double"], outs["single"])
    np.testing.assert_array_equal(outs["double"], outs["0"])  # block 0 is the one double-stream block
    capsys.readouterr()
    for spec, model, needle in (("middle", str(folder), "--p2p-blocks expects"),
                                ("5", str(folder), "0..2 for this transformer"),
                                ("double", "embedded", "UNet has none")):
        code = main([*base[:-4], "--method", "ddim", "--steps", "2", "--model", model, "--p2p-blocks", spec,
                     "-o", str(tmp_path / "bad.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (spec, err)


def test_pipeline_edits_with_p2p_masactrl_and_swap(pipe):
    case, size = _case("color"), _case("size", seed=4)
    inv = pipe.invert(np.stack([case.source, size.source]), [case.source_prompt, size.source_prompt],
                      method="ddim", steps=3)
    old, new = case.blend_words
    targets = [case.target_prompt, size.target_prompt]
    runs = {
        "swap": EditControls(p2p=None),
        "p2p": EditControls(p2p=P2PControls(blend_words=[((old,), (new,)), ((size.blend_words[0],),
                                                                           (size.blend_words[1],))])),
        "masactrl": EditControls(p2p=None, masactrl=MasaCtrlControls(start_t=999)),
    }
    out = {name: pipe.edit(inv, targets, controls) for name, controls in runs.items()}
    for name, result in out.items():
        assert result.nfe == 3 and result.images.shape == (2, 64, 64, 3) and np.isfinite(result.images).all()
        assert result.settings.extra["control"] == name
        # the source rows are not controlled: the reconstructions agree with the plain swap's (rounding aside)
        assert np.abs(result.reconstructions.astype(int) - out["swap"].reconstructions.astype(int)).max() <= 1
    assert not np.array_equal(out["p2p"].images, out["swap"].images)
    assert not np.array_equal(out["masactrl"].images, out["swap"].images)
    same = pipe.edit(inv, [case.source_prompt, size.source_prompt], EditControls(p2p=P2PControls(mode="replace")))
    assert np.abs(same.images.astype(int) - same.reconstructions.astype(int)).max() <= 1
    assert _default_processors(pipe.model.unet) == {"FluxAttnProcessor"} and not pipe.model.unet._forward_pre_hooks


def test_processors_are_restored_after_an_exception(pipe, monkeypatch):
    case = _case()
    inv = pipe.invert(case.source[None], [case.source_prompt], method="ddim", steps=2)

    def boom(self, *args, **kwargs):
        raise RuntimeError("boom in a joint attention layer")

    monkeypatch.setattr(PromptToPrompt, "attend_joint", boom)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls()))
    assert _default_processors(pipe.model.unet) == {"FluxAttnProcessor"} and not pipe.model.unet._forward_pre_hooks
