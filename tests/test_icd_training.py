import pytest
import torch
from safetensors.torch import load_file

from conftest import run_interrupted
from icd.models import lora
from icd.models.loading import load_model
from icd.train.icd import ICDConfig, learning_rate, train_icd
from icd.train.icd_step import Batch, adapter_objectives, batch_draws, icd_losses, own_latent_start


def _cfg(tmp_path, model_dir, out="icd", **kw):
    base = dict(out_dir=str(tmp_path / out), model=str(model_dir), steps=2, batch_size=2, n_images=8, rank=4,
                lr=1e-3, checkpoint_every=1, log_every=1, w_set=(0.0, 2.0))
    return ICDConfig(**{**base, **kw})


def _setup(cfg):
    model = load_model(cfg.model, unet_subfolder=cfg.unet_subfolder)
    lora.add_adapters(model.unet, rank=cfg.rank, alpha=cfg.alpha)
    for name in lora.ADAPTERS:  # non-zero B so every adapter changes the output
        for p in lora.lora_parameters(model.unet, name):
            torch.nn.init.normal_(p, std=0.02)
    return model


def _batch(cfg):
    """A model with live adapters and one step's draws for a batch of 3."""
    model = _setup(cfg)
    b = cfg.resolved_boundaries()
    d = batch_draws(cfg, 0, n_data=8, shape=(4, 16, 16), num_segments=b.num_segments)
    z0 = torch.randn(3, 4, 16, 16)
    cond = model.encode_prompt(["a large red circle on a gray background"] * 3)
    return model, b, d, z0, cond


@pytest.mark.parametrize("term, owner", [("cd_reverse", lora.REVERSE), ("preserve_reverse", lora.REVERSE),
                                         ("cd_forward", lora.FORWARD), ("preserve_forward", lora.FORWARD)])
def test_each_loss_sends_gradient_only_to_its_adapter(tmp_path, random_distilled_dir, term, owner):
    cfg = _cfg(tmp_path, random_distilled_dir, batch_size=3)
    model, b, d, z0, cond = _batch(cfg)
    losses = icd_losses(model, cfg, Batch(z0, cond, d, b))
    losses[term].backward()
    for name in lora.ADAPTERS:
        grads = [p.grad for p in lora.lora_parameters(model.unet, name)]
        got = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert got == (name == owner), (term, name)
    assert all(p.grad is None for n, p in model.unet.named_parameters() if ".lora_" not in n)


def test_lambdas_weight_the_adapter_objectives(tmp_path, random_distilled_dir):
    losses = {k: torch.tensor(v) for k, v in
              dict(cd_reverse=1.0, cd_forward=2.0, preserve_forward=3.0, preserve_reverse=4.0).items()}
    obj = adapter_objectives(losses, _cfg(tmp_path, random_distilled_dir, lambda_f=0.5, lambda_r=2.0))
    assert obj[lora.REVERSE].item() == 1.0 + 2.0 * 4.0 and obj[lora.FORWARD].item() == 2.0 + 0.5 * 3.0


@pytest.mark.parametrize("boundaries", ["4step-1", "3step"])
def test_training_saves_distinct_adapters_with_their_boundaries(tmp_path, random_distilled_dir, boundaries):
    final = train_icd(_cfg(tmp_path, random_distilled_dir, boundaries=boundaries))
    rev = load_file(str(final / f"{lora.REVERSE}.safetensors"))
    fwd = load_file(str(final / f"{lora.FORWARD}.safetensors"))
    assert rev.keys() == fwd.keys()
    assert any(not torch.equal(rev[k], fwd[k]) for k in rev)
    model = load_model(random_distilled_dir, unet_subfolder="unet_guidance")
    lora.add_adapters(model.unet, rank=4, alpha=8)
    meta = lora.load_adapters(model.unet, final)
    from icd.boundaries import Boundaries

    assert meta["boundaries"]["reverse"] == list(Boundaries.preset(boundaries).reverse)
    x, cond = torch.randn(1, 4, 16, 16), model.encode_prompt(["a small blue star on a white background"])
    with torch.no_grad():
        a = model.eps_fn(adapter=lora.REVERSE)(x, 500, cond)
        b = model.eps_fn(adapter=lora.FORWARD)(x, 500, cond)
    assert not torch.equal(a, b)


def test_sequential_update_takes_four_optimizer_steps(tmp_path, random_distilled_dir, monkeypatch):
    calls = []
    original = torch.optim.AdamW.step

    def counting(self, *a, **k):
        calls.append(1)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting)
    train_icd(_cfg(tmp_path, random_distilled_dir, out="seq", steps=1, update="sequential"))
    assert len(calls) == 4
    calls.clear()
    train_icd(_cfg(tmp_path, random_distilled_dir, out="joint", steps=1, update="joint"))
    assert len(calls) == 2


def test_icd_resume_is_exact(tmp_path, random_distilled_dir):
    train_icd(_cfg(tmp_path, random_distilled_dir, out="a", steps=2))
    train_icd(_cfg(tmp_path, random_distilled_dir, out="b", steps=1))
    train_icd(_cfg(tmp_path, random_distilled_dir, out="b", steps=2))
    a = load_file(str(tmp_path / "a" / "final" / f"{lora.REVERSE}.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / f"{lora.REVERSE}.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cosine_learning_rate_decays_and_an_interrupted_run_resumes_exactly(tmp_path, random_distilled_dir,
                                                                           monkeypatch):
    cfg = _cfg(tmp_path, random_distilled_dir, out="cos-a", steps=3, lr_schedule="cosine", lr_min=1e-5)
    assert [learning_rate(cfg, s) for s in (0, 3)] == [pytest.approx(1e-3), pytest.approx(1e-5)]
    assert learning_rate(cfg, 1) < cfg.lr and learning_rate(_cfg(tmp_path, random_distilled_dir), 1) == 1e-3
    train_icd(cfg)
    cfg_b = _cfg(tmp_path, random_distilled_dir, out="cos-b", steps=3, lr_schedule="cosine", lr_min=1e-5)
    run_interrupted(train_icd, cfg_b, after=1, monkeypatch=monkeypatch)
    train_icd(_cfg(tmp_path, random_distilled_dir, out="constant", steps=3))
    a, b, constant = _final(tmp_path, "cos-a"), _final(tmp_path, "cos-b"), _final(tmp_path, "constant")
    for name in lora.ADAPTERS:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])
        assert any(not torch.equal(a[name][k], constant[name][k]) for k in a[name])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="update"):
        ICDConfig(update="parallel")
    with pytest.raises(ValueError, match="strictly increasing|tile|start"):
        ICDConfig(reverse_boundaries=(0, 500, 400), forward_boundaries=(500, 400, 999))
    with pytest.raises(ValueError, match="mixed_precision"):
        ICDConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="tau"):
        ICDConfig(tau=1.5)
    with pytest.raises(ValueError, match="lr_schedule"):
        ICDConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_min"):
        ICDConfig(lr=1e-4, lr_min=1e-3)
    with pytest.raises(ValueError, match="reverse_own_latents"):
        ICDConfig(reverse_own_latents=1.5)
    with pytest.raises(ValueError, match="two segments"):
        ICDConfig(reverse_own_latents=0.5, reverse_boundaries=(0,), forward_boundaries=(999,))
    with pytest.raises(ValueError, match="reverse_own_w"):
        ICDConfig(reverse_own_latents=0.5, reverse_own_w=(5.0,))


def _final(tmp_path, out):
    return {n: load_file(str(tmp_path / out / "final" / f"{n}.safetensors")) for n in lora.ADAPTERS}


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path, random_distilled_dir):
    cfg = _cfg(tmp_path, random_distilled_dir, batch_size=3)
    model, b, d, z0, cond = _batch(cfg)

    def grads():
        model.unet.zero_grad(set_to_none=True)
        icd_losses(model, cfg, Batch(z0, cond, d, b), backward=torch.Tensor.backward)
        return [p.grad.clone() for name in lora.ADAPTERS for p in lora.lora_parameters(model.unet, name)]

    plain = grads()
    model.unet.enable_gradient_checkpointing()
    model.unet.train()
    checkpointed = grads()
    assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-7) for g, h in zip(plain, checkpointed))
    assert any(g.abs().sum() > 0 for g in plain)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_trains_and_resumes_exactly(tmp_path, random_distilled_dir, mode):
    """Autocast on the CPU stands in for the GPU here (device "cpu": "auto" would train a CPU run in fp32); fp16 also
    round-trips its loss scaler through checkpoints."""
    kw = dict(mixed_precision=mode, device="cpu")
    train_icd(_cfg(tmp_path, random_distilled_dir, out=f"{mode}-a", steps=2, **kw))
    train_icd(_cfg(tmp_path, random_distilled_dir, out=f"{mode}-b", steps=1, **kw))
    train_icd(_cfg(tmp_path, random_distilled_dir, out=f"{mode}-b", steps=2, **kw))
    train_icd(_cfg(tmp_path, random_distilled_dir, out="fp32", steps=2))
    a, b, ref = _final(tmp_path, f"{mode}-a"), _final(tmp_path, f"{mode}-b"), _final(tmp_path, "fp32")
    for name in lora.ADAPTERS:
        assert all(torch.isfinite(a[name][k]).all() and torch.equal(a[name][k], b[name][k]) for k in a[name])
        assert any(not torch.equal(a[name][k], ref[name][k]) for k in a[name])  # autocast really ran


def test_export_checkpoint_matches_the_final_adapters(tmp_path, random_distilled_dir):
    from icd.train.icd import export_checkpoint

    train_icd(_cfg(tmp_path, random_distilled_dir, out="run", steps=2))
    export_checkpoint(tmp_path / "run" / "step-000002", tmp_path / "exported")
    a, b = _final(tmp_path, "run"), {n: load_file(str(tmp_path / "exported" / f"{n}.safetensors"))
                                     for n in lora.ADAPTERS}
    assert all(torch.equal(a[n][k], b[n][k]) for n in lora.ADAPTERS for k in a[n])


def test_ema_adapters_differ_and_resume_exactly(tmp_path, random_distilled_dir):
    train_icd(_cfg(tmp_path, random_distilled_dir, out="ema-a", steps=3, ema_decay=0.9))
    train_icd(_cfg(tmp_path, random_distilled_dir, out="ema-b", steps=2, ema_decay=0.9))
    train_icd(_cfg(tmp_path, random_distilled_dir, out="ema-b", steps=3, ema_decay=0.9))
    train_icd(_cfg(tmp_path, random_distilled_dir, out="raw", steps=3))
    a, b, raw = _final(tmp_path, "ema-a"), _final(tmp_path, "ema-b"), _final(tmp_path, "raw")
    for name in lora.ADAPTERS:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name])
        assert any(not torch.equal(a[name][k], raw[name][k]) for k in a[name])


def test_init_adapters_starts_from_saved_weights_and_checks_the_rank(tmp_path, random_distilled_dir, monkeypatch):
    first = train_icd(_cfg(tmp_path, random_distilled_dir, out="first", steps=1))
    # a step whose optimizer updates nothing: the saved adapters are exactly the ones it started from
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: None)
    again = train_icd(_cfg(tmp_path, random_distilled_dir, out="again", steps=1, init_adapters=str(first), seed=5))
    monkeypatch.undo()
    for name in lora.ADAPTERS:
        a, b = load_file(str(first / f"{name}.safetensors")), load_file(str(again / f"{name}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="rank/alpha 4/8"):
        train_icd(_cfg(tmp_path, random_distilled_dir, out="other", rank=2, init_adapters=str(first)))


@pytest.mark.parametrize("field, value", [("steps", 0), ("steps", -1), ("lr", 0.0), ("lr", float("nan")),
                                          ("batch_size", 0), ("threads", -2), ("lr_min", 1.0)])
def test_shared_run_fields_are_checked_for_every_component(field, value):
    from icd.train.config import ConfigError
    from icd.train.guidance import GuidanceConfig
    from icd.train.judge import JudgeConfig
    from icd.train.teacher import TeacherConfig
    from icd.train.vae import VAEConfig

    for cls in (ICDConfig, VAEConfig, JudgeConfig, TeacherConfig, GuidanceConfig):
        with pytest.raises(ConfigError, match=f"{cls.__name__}.{field}"):
            cls(**{field: value})


def test_own_latent_rows_leave_the_other_draws_unchanged_and_train(tmp_path, random_distilled_dir):
    """Backward distillation (reverse_own_latents > 0): extra draws come last; own rows start at R's latents."""
    plain = _cfg(tmp_path, random_distilled_dir, batch_size=4)
    own = _cfg(tmp_path, random_distilled_dir, out="own", batch_size=4, reverse_own_latents=1.0)
    kw = dict(n_data=8, shape=(4, 16, 16), num_segments=4)
    d0, d1 = batch_draws(plain, 3, **kw), batch_draws(own, 3, **kw)
    assert set(d1) - set(d0) == {"own", "own_j"} and all(torch.equal(d0[k], d1[k]) for k in d0)
    assert bool(d1["own"].all()) and d1["own_j"].min() >= 1 and d1["own_j"].max() <= 3
    model, b, _, z0, cond = _batch(own)
    d = batch_draws(own, 0, n_data=8, shape=(4, 16, 16), num_segments=b.num_segments)
    d = {k: v[:3] for k, v in d.items()}
    a = icd_losses(model, own, Batch(z0, cond, d, b))["cd_reverse"]
    rest = {k: v for k, v in d.items() if not k.startswith("own")}
    p = icd_losses(model, plain, Batch(z0, cond, rest, b))["cd_reverse"]
    assert torch.isfinite(a) and not torch.isclose(a, p)
    final = train_icd(_cfg(tmp_path, random_distilled_dir, out="own-run", reverse_own_latents=0.5))
    assert (final / f"{lora.REVERSE}.safetensors").exists()


def test_own_latent_rows_can_be_restricted_to_guidance_codes(tmp_path, random_distilled_dir):
    """reverse_own_w: only rows drawn with a listed guidance code start from R's own latents."""
    cfg = _cfg(tmp_path, random_distilled_dir, batch_size=4, reverse_own_latents=1.0)
    model, b, _, z0, cond = _batch(cfg)
    d = batch_draws(cfg, 0, n_data=8, shape=(4, 16, 16), num_segments=b.num_segments)
    d["w"] = torch.tensor([0.0, 1.0, 0.0, 2.0])
    zero_eps = lambda w: lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    cond4 = cond.index(torch.tensor([0, 0, 0, 0]))
    rows, _, _ = own_latent_start(zero_eps, cond4, d, boundaries=b, schedule=model.schedule)
    assert rows.tolist() == [0, 1, 2, 3]
    rows, _, _ = own_latent_start(zero_eps, cond4, d, boundaries=b, schedule=model.schedule, own_w=(1.0, 2.0))
    assert rows.tolist() == [1, 3]
    assert own_latent_start(zero_eps, cond4, d, boundaries=b, schedule=model.schedule, own_w=(3.0,)) is None
