"""The compiled inference path (issue 36): torch.compile of the UNets, no graph break and no recompile once warm,
output within 2/255 of eager; the uint8 conversion on the device; SDXL's VAE in half precision with its fp32 re-run.

Two kinds of compile test, on the CPU:
- dynamo alone (``backend="eager"``: the graphs dynamo captures run eagerly, seconds): every editing control on the
  embedded model and a two-pass baseline, warmed once, then other edits of the same shapes compile nothing and break
  nowhere, and equal eager exactly;
- COMPILE-HEAVY: inductor itself on the smallest UNet there is (one level of width 32 with cross-attention) -- inductor
  compiles C++ kernels: the default test builds one graph (a reconstruction: the forward and the reverse adapter's
  fused weights through the same graph; 41 s with an empty inductor cache on the shared 2-core machine, 6 s with a
  warm one) and the full P2P edit (4 graphs, 61 s) is `slow`.
"""

import numpy as np
import pytest
import torch

from icd import world
from icd.editing.controllers import MasaCtrlControls, P2PControls
from icd.editing.edit import EditControls
from icd.imageio import to_uint8
from icd.models import lora
from icd.models.compiled import compiled_graphs, graph_breaks, resolve_mode
from icd.pipeline import Pipeline


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _case(seed: int, kind: str = "color"):
    return world.make_case(kind, world.EVAL_SEED_START + 7000 + seed, max_objects=1)


def _edits(pipe: Pipeline, seed: int) -> list[np.ndarray]:
    """iCD edits of world case `seed` with P2P + local blend and with MasaCtrl, DDIM 10 + 10 with P2P + local blend on
    the original UNet (two-pass CFG: batch 4), and null-text inversion 2 + 2 (its optimisation has gradients: eager)."""
    c = _case(seed)
    blend = EditControls(p2p=P2PControls(blend_words=((c.blend_words[0],), (c.blend_words[1],))))
    inv = pipe.invert(c.source[None], [c.source_prompt])
    out = [pipe.edit(inv, [c.target_prompt], blend).images,
           pipe.edit(inv, [c.target_prompt], EditControls(p2p=None, masactrl=MasaCtrlControls(start_t=999))).images]
    inv = pipe.invert(c.source[None], [c.source_prompt], method="ddim", steps=10)
    out.append(pipe.edit(inv, [c.target_prompt], blend).images)
    inv = pipe.invert(c.source[None], [c.source_prompt], method="nti", steps=2)
    return [*out, pipe.edit(inv, [c.target_prompt], blend).images]


class CountingBackend:
    """A dynamo backend that runs each captured graph eagerly and counts its runs (proof that the compiled code, not
    an eager fallback, serves the calls)."""

    def __init__(self):
        self.runs = 0

    def __call__(self, gm, example_inputs):
        def run(*args):
            self.runs += 1
            return gm(*args)

        return run


def test_compiled_edits_neither_break_nor_recompile_once_warm(fresh_dynamo, monkeypatch):
    from icd.models.base import LatentDiffusion

    grad_modes, real_unet = [], LatentDiffusion._unet

    def spy(self, *args, **kwargs):  # which UNet calls have autograd on (NTI's optimisation: eager by design)
        grad_modes.append(torch.is_grad_enabled())
        return real_unet(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusion, "_unet", spy)
    pipe = Pipeline.from_pretrained()
    eager = [_edits(pipe, s) for s in (0, 1)]
    backend = CountingBackend()
    for model in (pipe.icd_model, pipe.base()):
        model.compile("default", backend=backend)
    breaks0, graphs0 = graph_breaks(), compiled_graphs()
    warm = _edits(pipe, 0)  # the warm-up: every shape and controller state compiles here
    graphs_warm = compiled_graphs() - graphs0
    runs0, calls0 = backend.runs, len(grad_modes)
    timed = _edits(pipe, 1)  # another image, prompts and colours, the same shapes
    assert compiled_graphs() - graphs0 == graphs_warm, "a warm edit recompiled"
    assert graph_breaks() == breaks0, "a graph break in the compiled UNet"
    no_grad = grad_modes[calls0:].count(False)
    assert backend.runs - runs0 == no_grad > 0  # one whole compiled graph per UNet call without autograd
    assert grad_modes[calls0:].count(True) > 0  # NTI's inner steps: eager
    # per UNet: batch shapes x the controllers' states (P2P cross / self control on or off, local blend's first map),
    # never one graph per step: DDIM's 10 steps add the same few states as iCD's 4
    assert graphs_warm <= 12, graphs_warm
    for got, want in zip(warm + timed, eager[0] + eager[1]):
        assert np.array_equal(got, want)


def test_the_compile_mode_follows_the_device():
    assert resolve_mode("auto", "cuda") == "reduce-overhead" and resolve_mode(True, "cpu") == "default"
    assert resolve_mode(None, "cpu") is None and resolve_mode("none", "cuda") is None
    assert resolve_mode("max-autotune-no-cudagraphs", "cpu") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match="compile mode"):
        resolve_mode("fast", "cpu")


# ------------------------------------------------------------------ inductor (compile-heavy: the smallest UNet)
def _micro_pipeline() -> Pipeline:
    """The embedded model's text encoder, VAE and adapters' boundaries around the smallest UNet of its interface (one
    level of width 32 with cross-attention), both adapters fused with random non-zero deltas."""
    from diffusers import UNet2DConditionModel

    emb = Pipeline.from_pretrained().icd_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            mid_block_type=None, cross_attention_dim=emb.unet.config.cross_attention_dim, attention_head_dim=2,
            norm_num_groups=8, time_cond_proj_dim=emb.unet.config.time_cond_proj_dim)
        lora.add_adapters(unet, rank=4, alpha=4)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0.0, 0.05)
    model = emb.with_unet(unet)
    model.icd, model.fused = emb.icd, lora.FusedAdapters(unet)
    return Pipeline(model)


@pytest.fixture
def inductor_one_thread(fresh_dynamo):
    import torch._inductor.config as inductor

    with inductor.patch(compile_threads=1):  # no worker pool: one core may be all this machine has
        yield


def test_inductor_reconstruction_is_within_2_of_eager_and_swaps_adapters_without_recompiling(inductor_one_thread):
    """COMPILE-HEAVY (one inductor graph, 6-41 s): invert (forward adapter) and decode (reverse adapter) at batch 1
    run the same compiled graph; the fused weights' swap between them neither recompiles nor reads stale weights."""
    pipe = _micro_pipeline()
    cases = [_case(s) for s in (2, 3)]
    eager = [pipe.reconstruct(c.source[None], [c.source_prompt]).images for c in cases]
    pipe.compile("default")
    swaps0 = pipe.icd_model.fused.swaps
    warm = pipe.reconstruct(cases[0].source[None], [cases[0].source_prompt]).images
    graphs = compiled_graphs()
    again = pipe.reconstruct(cases[1].source[None], [cases[1].source_prompt]).images
    assert compiled_graphs() == graphs and graph_breaks() == 0
    assert pipe.icd_model.fused.swaps - swaps0 == 4  # forward, reverse, forward, reverse: one swap per phase
    for got, want in ((warm, eager[0]), (again, eager[1])):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2


@pytest.mark.slow
def test_inductor_p2p_edit_is_within_2_of_eager(inductor_one_thread):
    """COMPILE-HEAVY (4 inductor graphs: 61 s with an empty inductor cache on the shared 2-core CPU): the iCD P2P edit
    with local blend."""
    pipe = _micro_pipeline()
    c = _case(4)
    controls = EditControls(p2p=P2PControls(blend_words=((c.blend_words[0],), (c.blend_words[1],))))

    def edit():
        return pipe.edit(pipe.invert(c.source[None], [c.source_prompt]), [c.target_prompt], controls).images

    eager = edit()
    pipe.compile("default")
    edit()
    graphs = compiled_graphs()
    assert np.abs(edit().astype(int) - eager.astype(int)).max() <= 2
    assert compiled_graphs() == graphs and graph_breaks() == 0


# ------------------------------------------------------------------ uint8 on the device, SDXL's VAE
def test_uint8_conversion_equals_the_host_conversion():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(3, 3, 17, 9, generator=g) * 2.4 - 1.2,  # beyond [-1, 1]: clamped
                   torch.tensor([-1.0, 1.0, 0.0, 1 / 255, -1 / 255, 0.5 / 127.5 - 1]).repeat(3 * 17 * 9 // 6 + 1)[
                       :3 * 17 * 9].reshape(1, 3, 17, 9)])
    before = np.ascontiguousarray(  # the host conversion as it was
        x.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy())
    for t in (x, x.half(), x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):  # dtype, memory layout
        want = before if t.dtype == torch.float32 else np.ascontiguousarray(
            t.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).numpy())
        got = to_uint8(t)
        assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, want)


def _sdxl(tmp_path):
    from icd.models.synthetic import write_pipeline

    return write_pipeline(tmp_path / "sdxl", "sdxl", vocabulary=world.vocabulary())


def test_sdxl_vae_runs_in_half_precision_and_an_overflowing_batch_again_in_fp32(tmp_path):
    import copy

    from icd.models.loading import load_model

    files = _sdxl(tmp_path)
    half = load_model(files.pipeline, dtype=torch.float16)  # loading only (CPUs compute fp16 slowly)
    assert half.vae.dtype == torch.float16 and half.vae_upcast  # was: the whole VAE in fp32
    model = load_model(files.pipeline)
    model.vae = model.vae.half()  # as `sdxl.load` leaves it under fp16, on this CPU
    ref = copy.deepcopy(model.vae).float()  # the fp32 VAE of the same (fp16-rounded) weights: what ran before
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5

    def decode(vae):
        return vae.decode(z / model.scaling_factor).sample.float().clamp(-1, 1)

    got = model.decode_latents(z)
    assert model.vae_upcasts == 0 and (got - decode(ref)).abs().max() < 2e-2  # fp16 rounding only
    model.vae = copy.deepcopy(model.vae)  # another VAE: a new fp32 copy is made for it
    with torch.no_grad():  # weights that overflow fp16's range inside the decoder, finite in fp32
        model.vae.decoder.conv_in.weight.mul_(1e5)
    ref = copy.deepcopy(model.vae).float()
    assert not torch.isfinite(model.vae.decode(z.half() / model.scaling_factor).sample).all()
    got = model.decode_latents(z)
    assert model.vae_upcasts == 1 and torch.isfinite(got).all()
    assert torch.equal(got, decode(ref))  # the batch computed again in fp32, exactly as an fp32 VAE computes it
    model.decode_latents(z)
    assert model.vae_upcasts == 2  # each overflowing batch (the fp32 copy is kept)
    model.vae_upcast = False  # without the check the overflow reaches the image
    assert not torch.isfinite(model.decode_latents(z)).all()


def test_a_user_given_vae_replaces_the_pipelines_and_its_config_decides_the_check(tmp_path):
    from diffusers import AutoencoderKL

    from icd.models import sdxl
    from icd.models.loading import ModelError

    files = _sdxl(tmp_path)
    config = sdxl.vae_config(tiny=True, sample_size=64) | {"force_upcast": False}  # an fp16-safe VAE says so
    torch.manual_seed(5)
    AutoencoderKL(**config).save_pretrained(tmp_path / "vae-fp16-fix")
    pipe = Pipeline.from_pretrained(files.pipeline, unet=files.unet, lora_forward=files.lora_forward,
                                    lora_reverse=files.lora_reverse, vae=tmp_path / "vae-fp16-fix")
    assert not pipe.model.vae_upcast and pipe.model.vae.config.force_upcast is False
    saved = AutoencoderKL.from_pretrained(tmp_path / "vae-fp16-fix")
    assert torch.equal(pipe.model.vae.decoder.conv_in.weight, saved.decoder.conv_in.weight)
    assert pipe.base().vae is pipe.model.vae  # the baselines decode with it too
    for bad, why in ((tmp_path, "not a diffusers VAE folder"), (tmp_path / "gone", "not found")):
        with pytest.raises(ModelError, match=why):
            Pipeline.from_pretrained(files.pipeline, unet=files.unet, lora_forward=files.lora_forward,
                                     lora_reverse=files.lora_reverse, vae=bad)


def test_icd_edit_compile_runs_the_compiled_path_and_equals_eager(tmp_path, capsys, monkeypatch, fresh_dynamo):
    """``icd edit --compile`` (dynamo with the eager backend here: the option's plumbing, not inductor's time)."""
    from PIL import Image

    from icd.cli import main
    from icd.models.base import LatentDiffusion

    modes, real = [], LatentDiffusion.compile

    def eager_backend(self, mode="auto", *, backend="inductor"):
        modes.append(mode)
        real(self, mode, backend="eager")

    monkeypatch.setattr(LatentDiffusion, "compile", eager_backend)
    c = _case(6)
    Image.fromarray(c.source).save(tmp_path / "src.png")
    args = ["edit", str(tmp_path / "src.png"), "--source", c.source_prompt, "--target", c.target_prompt,
            "--threads", "1", "--json"]
    assert main([*args, "-o", str(tmp_path / "eager.png")]) == 0
    graphs = compiled_graphs()
    assert main([*args, "--compile", "-o", str(tmp_path / "compiled.png")]) == 0
    assert modes == ["auto"] and compiled_graphs() > graphs  # the UNet calls went through torch.compile
    capsys.readouterr()
    eager, compiled = (np.asarray(Image.open(tmp_path / n)) for n in ("eager.png", "compiled.png"))
    assert np.array_equal(eager, compiled)
    with pytest.raises(SystemExit):  # an unknown mode: argparse's usage error, exit 2
        main([*args, "--compile", "fastest", "-o", str(tmp_path / "x.png")])


def test_icd_bench_compile_warms_every_timed_case_and_records_the_mode(tmp_path, monkeypatch, fresh_dynamo):
    """``icd bench --compile``: the pipeline compiled, every timed case run once untimed first (each case's graphs
    built before the clock), the mode in results.json (dynamo with the eager backend here)."""
    from icd.bench import BenchOptions, run_bench
    from icd.bench import runtime as bench_runtime
    from icd.models.base import LatentDiffusion

    real_compile, real_timed = LatentDiffusion.compile, bench_runtime.timed_runs
    warm = []
    monkeypatch.setattr(LatentDiffusion, "compile", lambda self, mode="auto", *, backend="inductor":
                        real_compile(self, mode, backend="eager"))

    def timed_runs(shards, cases, run, *, warm_all=False):
        warm.append(warm_all)
        return real_timed(shards, cases, run, warm_all=warm_all)

    for module in ("editing", "inversion", "generation", "guidance"):
        monkeypatch.setattr(f"icd.bench.{module}.timed_runs", timed_runs)
    results = run_bench(BenchOptions(task="inversion", out=str(tmp_path / "b"), n=2, methods="icd", n_timing=2,
                                     examples=0, device="cpu", compile="auto", progress=False))
    assert results["compile"] == "auto" and warm == [True] and compiled_graphs() > 0
