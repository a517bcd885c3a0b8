"""The edit at the floor (issue 36): fused adapters with peft out of the forward and one weight swap per phase,
per-call UNet inputs built once on the device, attention control on SDPA equal to the materialised maps."""

import pytest
import torch
from peft.tuners.lora import layer as peft_layer

from icd import world
from icd.editing.attention import attention_probs, controlled
from icd.editing.controllers import (
    BLEND_MAX_TOKENS,
    Controller,
    MasaCtrl,
    MasaCtrlControls,
    P2PControls,
    PromptToPrompt,
)
from icd.editing.edit import EditControls
from icd.guidance import dynamic_guidance
from icd.models import lora
from icd.models.base import dynamic_code
from icd.pipeline import Pipeline


@pytest.fixture(scope="module")
def editor(random_icd_dir):
    return Pipeline.from_pretrained(random_icd_dir)


def _case(seed=11, kind="color"):
    return world.make_case(kind, world.EVAL_SEED_START + seed)


# ------------------------------------------------------------------ the materialised reference (the old processor)
class MaterialisedP2P(PromptToPrompt):
    """Prompt-to-Prompt as it was before SDPA: every controlled layer's probabilities materialised, edited on a copy,
    multiplied with the values."""

    def attend(self, query, key, value, *, mask, scale, info, tokens):
        return Controller.attend(self, query, key, value, mask=mask, scale=scale, info=info, tokens=tokens)

    def needs_probs(self, info, tokens):
        if info.is_cross:
            return self.step < self.cross_steps or (self.blend is not None and tokens <= BLEND_MAX_TOKENS)
        return self.step < self.self_steps and tokens <= self.max_self_tokens

    def attention(self, probs, info, tokens):
        src, tgt = self.source_rows, self.target_rows
        probs = probs.clone()
        if info.is_cross:
            if self.step < self.cross_steps:
                mapped = torch.einsum("thqk,tkj->thqj", probs[src], self.mappers.to(probs))
                new = mapped + probs[tgt] * self.keep.to(probs)[:, None, None, :]
                probs[tgt] = new * self.equalizer.to(probs)[:, None, None, :]
            if self.blend is not None and tokens <= BLEND_MAX_TOKENS:
                rows = probs[self.cond_offset:self.cond_offset + self.num_rows]
                self.maps[tokens] = self.maps.get(tokens, 0) + rows.mean(dim=1).detach().float()
        elif self.step < self.self_steps and tokens <= self.max_self_tokens:
            probs[tgt] = probs[src]
        return probs


class CopiedMasaCtrl(MasaCtrl):
    """MasaCtrl's keys and values shared by copy-then-write, as before."""

    def share_source(self, x):
        x = x.clone()
        targets = self.num_sources + torch.arange(len(self.source_of))
        for offset in sorted({0, self.cond_offset}):
            x[offset + targets] = x[offset + self.source_of]
        return x


P2P_CASES = {
    "replace": ("a red star on a black background", ["a blue star on a black background"], P2PControls()),
    "refine": ("a red star on a black background", ["a large red star on a black background"], P2PControls()),
    "reweight": ("a red star on a black background", ["a blue star on a black background"],
                 P2PControls(reweight={"blue": -3.0}, reweight_new_words=None)),
    "two targets": ("a red star on a black background",
                    ["a blue star on a black background", "a large red star on a black background"], P2PControls()),
    "blend": ("a red star on a black background", ["a blue star on a black background"],
              P2PControls(blend_words=(("red",), ("blue",)))),
}


@pytest.mark.parametrize("name", list(P2P_CASES))
@pytest.mark.parametrize("halves", [1, 2])  # alone, or after an unconditional half (two-pass CFG)
def test_p2p_on_sdpa_equals_the_materialised_maps(editor, name, halves):
    model = editor.model
    source, targets, controls = P2P_CASES[name]
    source_of = [0] * len(targets)
    cond = model.encode_prompt([source, *targets])
    if halves == 2:
        cond = type(cond).cat([model.empty_cond(len(cond)), cond])
    x = torch.randn(len(cond), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((len(cond),), 700)
    outs, maps = [], []
    for cls in (PromptToPrompt, MaterialisedP2P):
        ctrl = cls(model.tokenizer, [source], targets, source_of, num_steps=4, controls=controls,
                   latent_shape=(16, 16))
        with controlled(model.unet, ctrl), torch.no_grad():
            for step in (0, 1, 3):  # cross + self control, self only, neither
                ctrl.begin_step(step, 700)
                outs.append(model.unet(x, t, encoder_hidden_states=cond.tokens).sample)
        maps.append(ctrl.maps)
    half = len(outs) // 2
    for new, ref in zip(outs[:half], outs[half:]):
        torch.testing.assert_close(new, ref, rtol=1e-4, atol=1e-5)
    assert maps[0].keys() == maps[1].keys()
    for k in maps[0]:
        torch.testing.assert_close(maps[0][k], maps[1][k], rtol=1e-4, atol=1e-6)
    assert not torch.equal(outs[0], outs[2])  # the control acts at step 0 and not at step 3


def test_masactrl_gathers_what_the_copy_wrote(editor):
    model = editor.model
    cond = model.encode_prompt(["a red star on a black background", "a large red star on a black background"])
    cond = type(cond).cat([model.empty_cond(2), cond])
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    outs = []
    for cls in (MasaCtrl, CopiedMasaCtrl):
        ctrl = cls([0], 4, MasaCtrlControls(start_t=999), first_decoder_layer=0)
        ctrl.begin_step(0, 500)
        with controlled(model.unet, ctrl), torch.no_grad():
            outs.append(model.unet(x, torch.full((4,), 500), encoder_hidden_states=cond.tokens).sample)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def test_an_edit_materialises_maps_only_for_local_blend_at_16x16_or_fewer(editor, monkeypatch):
    import icd.editing.controllers as controllers

    sizes = []
    real = controllers.attention_probs

    def spy(query, key, mask, scale):
        sizes.append(query.shape[-2])
        return real(query, key, mask, scale)

    monkeypatch.setattr(controllers, "attention_probs", spy)
    case = _case()
    inv = editor.invert(case.source[None], [case.source_prompt])
    editor.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls()))
    assert sizes == []
    blend = tuple((w,) for w in case.blend_words)
    editor.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls(blend_words=blend)))
    assert sizes and max(sizes) <= BLEND_MAX_TOKENS


def test_attention_probs_is_softmax_of_the_scaled_scores():
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4)
    mask = torch.zeros(2, 3, 5, 7)
    mask[..., -2:] = -1e4
    p = attention_probs(q, k, mask, 0.5)
    torch.testing.assert_close(p, ((q @ k.transpose(-1, -2)) * 0.5 + mask).softmax(-1))
    assert p[..., -2:].max() < 1e-6


# ------------------------------------------------------------------ fused adapters: no peft in the forward
def test_fused_unet_runs_no_peft_code_and_swaps_once_per_phase(editor, monkeypatch):
    model = editor.model
    fused = model.fused
    assert fused is not None
    calls = []
    for cls in (peft_layer.Linear, peft_layer.Conv2d):
        real = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, *a, _real=real, **k: calls.append(1) or _real(self, *a, **k))
    case = _case()
    before = fused.swaps
    inv = editor.invert(case.source[None], [case.source_prompt])
    editor.edit(inv, [case.target_prompt], EditControls(p2p=P2PControls()))
    assert calls == []  # every wrapper ran its base layer's forward
    assert fused.swaps - before <= 2  # forward adapter for the inversion, reverse for the decode: once each
    unet_calls = model.counter.calls
    eps = model.eps_fn(adapter=lora.REVERSE)
    x, cond = torch.randn(1, 4, 16, 16), model.encode_prompt([case.source_prompt])
    swaps = fused.swaps
    with torch.no_grad():
        for t in (999, 759, 499, 259):
            eps(x, t, cond)
    assert fused.swaps - swaps <= 1 and model.counter.calls == unet_calls + 4


def test_fused_unet_released_to_peft_computes_the_lora_branches_again(random_icd_dir):
    from icd.models.loading import load_icd_model

    model = load_icd_model(random_icd_dir, fuse=True)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), model.encode_prompt(["a red star"]).tokens
    with torch.no_grad():
        model.fused.activate(lora.REVERSE)
        fused_out = model.unet(x, t, c).sample
        model.fused.release()
        lora.use(model.unet, lora.REVERSE)
        peft_out = model.unet(x, t, c).sample
        lora.use(model.unet, None)
        plain = model.unet(x, t, c).sample
    torch.testing.assert_close(fused_out, peft_out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fused_out, plain, atol=1e-6)


def test_fused_memory_counts_each_layout():
    from diffusers import UNet2DConditionModel

    from icd.models import sd15

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15.unet_config())
    m = lora.fused_memory(unet, rank=64)
    assert 0 < m["adapted"] < m["base"] and m["lora"] > 0
    assert m["fused_unets"] == m["base"] + 2 * m["adapted"]
    assert m["refuse_per_phase"] < m["fused_unets"] < m["fused_copies"]


# ------------------------------------------------------------------ per-call inputs built once on the device
def test_dynamic_code_rounds_as_dynamic_guidance_at_every_timestep():
    for tau in (None, 0.0, 0.3, 0.7, 0.8, 0.85, 0.999, 1.0):
        for w in (0.0, 1.0, 2.5, 7.0):
            ref = dynamic_guidance(torch.arange(1001), torch.full((1001,), w), tau)
            got = torch.tensor([dynamic_code(t, w, tau) for t in range(1001)])
            assert torch.equal(got, ref), (tau, w)


def test_float_guidance_reuses_one_device_embedding_and_equals_per_row_codes(editor):
    model = editor.model
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    cond = model.encode_prompt(["a red star on a black background"] * 2)
    with torch.no_grad():
        for t in (999, 500):
            got = model.eps_fn(adapter=lora.REVERSE, guidance=3.0, tau=0.8)(x, t, cond)
            ref = model.eps_fn(adapter=lora.REVERSE, guidance=torch.tensor([3.0, 3.0]), tau=0.8)(x, t, cond)
            assert torch.equal(got, ref)
    assert model._timesteps(500, 2, x.device) is model._timesteps(500, 2, x.device)
    assert model._guidance_rows(3.0, 2, x.device) is model._guidance_rows(3.0, 2, x.device)


# ------------------------------------------------------------------ the timing harness's floor row
def test_timing_harness_has_a_floor_row_with_stages_ops_and_load(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "sd_shaped_timing.py"
    spec = importlib.util.spec_from_file_location("sd_shaped_timing_floor", script)
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    resets = []
    real_reset = timing.reset_peak
    monkeypatch.setattr(timing, "reset_peak", lambda device: resets.append(1) or real_reset(device))
    report = timing.main(["--device", "cpu", "--family", "sd15", "--scale", "20", "--image-size", "64", "--warmups",
                          "1", "--skip", "b8,ddim,npi,nti,train", "--out", str(tmp_path / "t.json")])
    edit, floor = report["edit"]
    assert (edit["method"], floor["method"]) == ("icd", "floor") and edit["runs"] == floor["runs"] == 5
    assert len(resets) == 3  # once per row before its warm-ups, once after the editing rows: never between runs
    for row in (edit, floor):
        assert set(row["stages"]) == set(timing.STAGES) and len(row["loadavg"]) == 2 and row["aten_ops"] > 0
        assert all(0 <= v["min_s"] <= v["median_s"] for v in row["stages"].values())
        assert row["total_min_s"] == pytest.approx(min(row["total_s_runs"]), abs=1e-5)
        assert row["total_min_s"] <= row["total_s"]
    ratio = edit["floor_ratio"]
    assert ratio["aten_ops"] == pytest.approx(edit["aten_ops"] / floor["aten_ops"])
    assert ratio["median"] == pytest.approx(edit["total_s"] / floor["total_s"])
    assert 1.0 <= ratio["aten_ops"] < 1.5  # the floor is the edit's own network calls, nothing more


def test_the_device_input_cache_stays_bounded(editor, monkeypatch):
    from icd.models import base

    model = editor.model
    monkeypatch.setattr(base, "DEVICE_CACHE_MAX", 8)
    for t in range(100):
        model._timesteps(t, 1, torch.device("cpu"))
        model._guidance_rows(t / 10, 1, torch.device("cpu"))
    assert len(model._device_cache) <= 8
    assert torch.equal(model._timesteps(7, 3, torch.device("cpu")), torch.full((3,), 7))
