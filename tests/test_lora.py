import json

import pytest
import torch

from icd.models import lora, tiny


def _unet():
    torch.manual_seed(0)
    unet = tiny.build_unet()
    lora.add_adapters(unet, rank=4, alpha=8)
    for name in lora.ADAPTERS:  # make the adapters differ from identity so outputs change
        for p in lora.lora_parameters(unet, name):
            torch.nn.init.normal_(p, std=0.05)
    return unet


def _out(unet, name):
    x, t, c = torch.ones(2, 4, 16, 16), torch.tensor([10, 900]), torch.ones(2, 20, 64)
    lora.use(unet, name)
    with torch.no_grad():
        return unet(x, t, c).sample


def test_adapters_differ_and_teacher_is_the_base():
    unet = _unet()
    rev, fwd, base = _out(unet, lora.REVERSE), _out(unet, lora.FORWARD), _out(unet, None)
    assert not torch.allclose(rev, fwd) and not torch.allclose(rev, base)
    plain = tiny.build_unet()
    torch.manual_seed(0)
    plain = tiny.build_unet()
    with torch.no_grad():
        ref = plain(torch.ones(2, 4, 16, 16), torch.tensor([10, 900]), torch.ones(2, 20, 64)).sample
    torch.testing.assert_close(base, ref)


def test_gradients_reach_both_adapters_in_one_graph():
    unet = _unet()
    unet.train()
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 20, 64)
    lora.use(unet, lora.REVERSE, trainable=lora.ADAPTERS)
    loss_r = unet(x, t, c).sample.pow(2).mean()
    lora.use(unet, lora.FORWARD, trainable=lora.ADAPTERS)
    loss_f = unet(x, t, c).sample.pow(2).mean()
    (loss_r + loss_f).backward()
    for name in lora.ADAPTERS:
        grads = [p.grad for p in lora.lora_parameters(unet, name)]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for n, p in unet.named_parameters() if ".lora_" not in n)


def test_save_load_round_trip_keeps_adapters_apart(tmp_path):
    unet = _unet()
    files = lora.save_adapters(unet, tmp_path / "ad", {"boundaries": [0, 259]})
    assert files[lora.REVERSE] != files[lora.FORWARD]
    rev, fwd = _out(unet, lora.REVERSE), _out(unet, lora.FORWARD)
    torch.manual_seed(1)
    fresh = tiny.build_unet()
    torch.manual_seed(0)
    fresh.load_state_dict(tiny.build_unet().state_dict())
    lora.add_adapters(fresh, rank=4, alpha=8)
    meta = lora.load_adapters(fresh, tmp_path / "ad")
    assert meta["boundaries"] == [0, 259]
    assert torch.equal(_out(fresh, lora.REVERSE), rev)
    assert torch.equal(_out(fresh, lora.FORWARD), fwd)
    assert not torch.equal(rev, fwd)


def test_fused_adapters_match_the_lora_branches_and_switch_without_drift():
    unet = _unet()
    ref = {name: _out(unet, name) for name in (lora.REVERSE, lora.FORWARD, None)}
    originals = [p.detach().clone() for p in unet.parameters()]
    fused = lora.FusedAdapters(unet)
    x, t, c = torch.ones(2, 4, 16, 16), torch.tensor([10, 900]), torch.ones(2, 20, 64)
    for _ in range(3):  # switching back and forth recomputes nothing, so nothing drifts
        for name in (lora.FORWARD, lora.REVERSE, None):
            fused.activate(name)
            with torch.no_grad():
                torch.testing.assert_close(unet(x, t, c).sample, ref[name], rtol=1e-4, atol=1e-5)
    fused.activate(None)
    assert all(torch.equal(a, b) for a, b in zip(originals, unet.parameters()))  # the base weights are untouched


def test_fused_model_edits_like_the_unfused_one(random_icd_dir):
    import numpy as np

    from icd import world
    from icd.models.loading import load_icd_model
    from icd.pipeline import Pipeline

    case = world.make_case("color", world.EVAL_SEED_START + 3)
    results = []
    for fuse in (True, False):
        editor = Pipeline(load_icd_model(random_icd_dir, fuse=fuse))
        inv = editor.invert(case.source[None], [case.source_prompt])
        results.append(editor.edit(inv, [case.target_prompt]).images.astype(int))
    assert np.abs(results[0] - results[1]).max() <= 1  # uint8 rounding of float-rounding differences


def test_truncate_rank_keeps_low_rank_products_and_the_best_approximation():
    g = torch.Generator().manual_seed(0)
    # a linear pair whose product has rank 3 inside rank 8, and a conv pair (A: [r, in, 3, 3], B: [out, r, 1, 1])
    a_lin = torch.randn(8, 12, generator=g)
    b_lin = torch.randn(10, 3, generator=g) @ torch.randn(3, 8, generator=g)
    a_conv, b_conv = torch.randn(8, 4, 3, 3, generator=g), torch.randn(6, 8, 1, 1, generator=g)
    state = {"x.lora_A.weight": a_lin, "x.lora_B.weight": b_lin,
             "y.lora_A.weight": a_conv, "y.lora_B.weight": b_conv}
    cut = lora.truncate_rank(state, 4)
    assert cut["x.lora_A.weight"].shape == (4, 12) and cut["x.lora_B.weight"].shape == (10, 4)
    assert cut["y.lora_A.weight"].shape == (4, 4, 3, 3) and cut["y.lora_B.weight"].shape == (6, 4, 1, 1)
    torch.testing.assert_close(cut["x.lora_B.weight"] @ cut["x.lora_A.weight"], b_lin @ a_lin, atol=1e-4, rtol=1e-4)
    full = b_conv.reshape(6, 8) @ a_conv.reshape(8, -1)
    approx = cut["y.lora_B.weight"].reshape(6, 4) @ cut["y.lora_A.weight"].reshape(4, -1)
    s = torch.linalg.svdvals(full.double())
    assert abs(torch.linalg.matrix_norm(full - approx).item() - s[4:].norm().item()) < 1e-4  # Eckart–Young
    with pytest.raises(ValueError, match="not below"):
        lora.truncate_rank(state, 8)


def test_truncated_adapter_copies_load_at_the_new_rank(random_icd_dir, tmp_path):
    meta = lora.copy_adapters(random_icd_dir / "icd", tmp_path / "cut", rank=2, dtype=torch.float16,
                              metadata={"teacher": "elsewhere"})
    assert (meta["rank"], meta["alpha"], meta["trained_rank"], meta["trained_alpha"]) == (2, 4, 4, 8)
    assert meta["teacher"] == "elsewhere" == json.loads((tmp_path / "cut" / "adapters.json").read_text())["teacher"]
    unet = tiny.build_unet()
    assert lora.attach_adapters(unet, tmp_path / "cut")["rank"] == 2
    assert all(p.shape[0] == 2 for n, p in unet.named_parameters() if ".lora_A." in n)
    with pytest.raises(ValueError, match="rank 4"):  # not below the trained rank
        lora.copy_adapters(random_icd_dir / "icd", tmp_path / "bad", rank=4)
