"""ReNoise and GNRI (`icd.methods.renoise`, `icd.methods.gnri`): the iCD reverse model alone, inverted by fixed-point
re-noising or Newton-Raphson, through the registry (`icd edit / invert --method`, `icd bench` rows) on the embedded
model and on tiny SD 1.5 / SDXL pipelines; the fixed point, the noise correction and the counted NFE."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import icd.methods  # noqa: F401 (imported first: the live registry answers the CLI's menus)
from icd import world
from icd.bench.methods import parse_methods
from icd.cli import main
from icd.editing.edit import EditControls
from icd.imageio import to_uint8
from icd.methods import REGISTRY
from icd.methods.gnri import GNRI
from icd.methods.renoise import ReNoise, corrected
from icd.models import lora
from icd.models.synthetic import write_pipeline
from icd.pipeline import Pipeline
from icd.samplers import ddim_loop
from icd.solver import NumericsError, ddim_jump

NAMES = ("renoise", "renoise-4call", "gnri", "gnri-4call")
NFE_INVERT = {"renoise": 35, "renoise-4call": 4, "gnri": 8, "gnri-4call": 4}  # the modules' docstrings


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("embedded")


@pytest.fixture(scope="module")
def cases():
    return [world.make_case("color", world.EVAL_SEED_START + i) for i in range(2)]


def _images(cases):
    return np.stack([c.source for c in cases]), [c.source_prompt for c in cases]


def _invert(pipe, method, cases):
    """`method` (an object, maybe not registered) inverting the cases' sources: (inversion, model, cond)."""
    images, prompts = _images(cases)
    model = method.model(pipe)
    z0 = model.encode_images(images)
    st = method.settings(pipe, "invert", seed=0)
    inv = method.invert(pipe, model, z0, prompts, st=st, guidance=None, ddim_rule="reference", progress=False,
                        should_stop=None)
    return inv, model, model.encode_prompt(prompts)


def _residuals(inv, model, cond) -> np.ndarray:
    """Per inversion step: |reverse jump t -> s of the inverted z_t - z_s| / |z_s| (0 at the exact fixed point)."""
    eps = model.eps_fn(adapter=lora.REVERSE)
    out = []
    for k in range(1, len(inv.timesteps)):
        t, s = inv.timesteps[k], inv.timesteps[k - 1]
        z_t, z_s = inv.latents[k], inv.latents[k - 1]
        out.append(float((ddim_jump(z_t, eps(z_t, t, cond), t, s, schedule=model.schedule) - z_s).norm() / z_s.norm()))
    return np.array(out)


def test_registry_lists_them_for_inversion_and_editing_but_not_generation():
    for name in NAMES:
        method = REGISTRY.get(name)
        assert method.tasks == ("invert", "reconstruct", "edit") and method.own_steps
    assert set(NAMES) <= set(REGISTRY.names("edit")) and not set(NAMES) & set(REGISTRY.names("generate"))
    assert [m.name for m in parse_methods("icd,renoise,gnri,renoise-4call,gnri-4call")] == ["icd", *NAMES[::2],
                                                                                            *NAMES[1::2]]
    with pytest.raises(ValueError, match="adapters' step count"):
        parse_methods("renoise4")


def test_counted_nfe_equals_the_documented_count(pipe, cases):
    images, prompts = _images(cases)
    assert sum(ReNoise().calls_per_step(i) for i in range(4)) == 35
    for name in NAMES:
        model = REGISTRY.get(name).model(pipe)
        model.counter.reset()
        r = pipe.reconstruct(images, prompts, method=name)
        assert (r.nfe_invert, r.nfe_decode) == (NFE_INVERT[name], 4), name
        # ReNoise's first call of each step carries the regularisation's target rows in the same batch
        per_step = [REGISTRY.get(name).calls_per_step(i) for i in range(4)] if name.startswith("renoise") else []
        expected = [4 if i == 0 else 2 for n in per_step for i in range(n)] or [2] * NFE_INVERT[name]
        assert model.counter.batch_sizes == expected + [2] * 4, name
        assert r.settings.steps == 4 and r.images.shape == images.shape


def test_more_fixed_point_iterations_reproduce_the_start_latent_better(pipe, cases):
    plain = dict(average=False, reg_steps=0)
    res = [_residuals(*_invert(pipe, ReNoise(iterations=k, first_iterations=k, **plain), cases)) for k in (0, 2, 9)]
    assert (res[1] < res[0]).all() and (res[2] < res[1]).all() and res[2].max() < 0.02, res
    # GNRI's first iterate is that same one-call fixed-point step; its Newton iterations shrink the residual too
    one, *_ = _invert(pipe, GNRI(iterations=1), cases)
    zero, model, cond = _invert(pipe, ReNoise(iterations=0, first_iterations=0, **plain), cases)
    for a, b in zip(one.latents, zero.latents):
        torch.testing.assert_close(a, b)
    gnri = [_residuals(*_invert(pipe, GNRI(iterations=k), cases)) for k in (1, 2, 4)]
    assert (gnri[1] < gnri[0]).all() and (gnri[2] < gnri[1]).all(), gnri


def test_noise_correction_lands_the_decoder_on_every_inverted_latent(pipe, cases):
    inv, model, cond = _invert(pipe, ReNoise(), cases)
    eps = model.eps_fn(adapter=lora.REVERSE)
    times = list(reversed(inv.timesteps))
    run = ddim_loop(corrected(eps, inv, model.schedule, torch.arange(2)), inv.noise, cond, times,
                    schedule=model.schedule)
    for visited, latent in zip(run.visited[:-1], reversed(inv.latents[1:])):  # every noisy time
        torch.testing.assert_close(visited, latent, atol=1e-4, rtol=1e-4)
    plain = ddim_loop(eps, inv.noise, cond, times, schedule=model.schedule)
    assert (plain.visited[1] - inv.latents[-2]).abs().max() > 1e-2  # without it the first jump misses z_s


@pytest.mark.parametrize("name", ["renoise", "gnri"])
def test_an_edit_to_the_source_prompt_reproduces_the_reconstruction(pipe, cases, name):
    images, prompts = _images(cases)
    inv = pipe.invert(images, prompts, method=name)
    out = pipe.edit(inv, prompts, EditControls(guidance=0.0))
    diff = np.abs(out.images.astype(int) - out.reconstructions.astype(int))
    assert diff.max() <= 1 and out.nfe == 4
    recon = to_uint8(pipe.icd_model.decode_latents(pipe.decode(inv)))
    assert np.abs(recon.astype(int) - out.reconstructions.astype(int)).max() <= 1


def test_bad_step_counts_and_foreign_records_are_refused(pipe, cases):
    images, prompts = _images(cases)
    with pytest.raises(ValueError, match="take 4 steps, not 8"):
        pipe.invert(images, prompts, method="renoise", steps=8)
    inv = pipe.invert(images[:1], prompts[:1], method="icd")
    with pytest.raises(ValueError, match="not these adapters'"):
        REGISTRY.get("gnri").check_inversion(pipe.icd_model, inv)
    with pytest.raises(TypeError, match="unknown option 'name'"):
        ReNoise(name="x")

    class Broken(GNRI):  # a network that returns NaN: the step that produced it is named
        def decoder_eps(self, model, *, guidance, tau, uncond=None):
            return lambda x, t, cond: torch.full_like(x, float("nan"))

    with pytest.raises(NumericsError, match=r"inversion step 0 \(t = 0 -> 259\)"):
        _invert(pipe, Broken(), cases[:1])


def test_cli_edit_and_invert_run_them_with_counted_nfe(tmp_path, capsys, cases):
    image = tmp_path / "src.png"
    Image.fromarray(cases[0].source).save(image)
    code = main(["edit", str(image), "--method", "renoise", "--source", cases[0].source_prompt, "--target",
                 cases[0].target_prompt, "--json", "-o", str(tmp_path / "edit.png")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (report["nfe_invert"], report["nfe"]) == (35, 39) and (tmp_path / "edit.png").is_file()
    code = main(["invert", str(image), "--method", "gnri", "--prompt", cases[0].source_prompt, "--json", "-o",
                 str(tmp_path / "rec.png")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and (report["nfe_invert"], report["nfe_decode"]) == (8, 4) and report["psnr"] > 20


def test_bench_editing_rows(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "editing", "--n", "1", "--kinds", "color", "--methods", "renoise-4call,gnri-4call",
                 "--n-timing", "1", "--examples", "0", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    methods = json.loads((out / "results.json").read_text())["methods"]
    for name in ("renoise-4call", "gnri-4call"):
        assert (methods[name]["nfe_invert"], methods[name]["nfe_edit"]) == (4, 4)
        assert np.isfinite(methods[name]["gt_psnr"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_stable_diffusion_families(family, tmp_path):
    """The reverse adapter given in the released LoRA layout is the few-step generator."""
    f = write_pipeline(tmp_path, family, vocabulary=world.vocabulary())
    sd = Pipeline.from_pretrained(f.pipeline, unet=f.unet, lora_forward=f.lora_forward, lora_reverse=f.lora_reverse)
    scene = world.sample_scene(20, max_objects=1)
    image, caption = world.render(scene), scene.caption
    color = scene.objects[0].color
    target = caption.replace(color, "blue" if color != "blue" else "red")
    for name, nfe in (("renoise", 35), ("gnri", 8)):
        inv = sd.invert(image, caption, method=name)
        assert inv.run.nfe == nfe and inv.noise.shape == (1, 4, 8, 8)
        out = sd.edit(inv, [target])
        assert out.nfe == 4 and out.images.shape == (1, 64, 64, 3)
        same = sd.edit(inv, [caption], EditControls(guidance=0.0))
        assert np.abs(same.images.astype(int) - same.reconstructions.astype(int)).max() <= 1
