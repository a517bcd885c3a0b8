"""Memory for the big flow models (`icd.models.memory`, docs/flow-models.md): the weights' bytes from the safetensors
headers against the tensors themselves (plain, sharded, with a variant beside, with iCD adapters and their fused
copies), the one-line refusal of a load that cannot fit (CPU RAM; CUDA arithmetic with the free memory patched) before
any weight loads, CPU offload that changes no image, and the CLI's exit 2.

On this CPU-only machine the execution device is the CPU, so offload moves nothing: what is tested is that the hooks
attach, the methods run through them and give the same images. Real GPU offload (the peak memory of each mode) is
not tested here."""

import json
import shutil

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from icd import world
from icd.boundaries import Boundaries
from icd.cli import common, main
from icd.imageio import save_image
from icd.models import flux, lora, memory, sd3
from icd.models.loading import ModelError
from icd.pipeline import Pipeline


@pytest.fixture(scope="module")
def case():
    return world.make_case("color", world.EVAL_SEED_START + 3)


def loaded_bytes(folder, dtype) -> int:
    """The bytes of every tensor of a component folder's safetensors files once loaded at `dtype` (floats cast)."""
    return sum((t.to(dtype) if t.is_floating_point() else t).nbytes for f in sorted(folder.glob("*.safetensors"))
               for t in load_file(str(f)).values())


@pytest.fixture(scope="module")
def icd_folder(tiny_flux_folder, tmp_path_factory):
    """The tiny FLUX folder with a guidance-embedding transformer_guidance/ (random) and rank-2 iCD adapters in icd/
    (random non-zero LoRA factors): the iCD layout, without training."""
    out = tmp_path_factory.mktemp("memory_icd") / "model"
    shutil.copytree(tiny_flux_folder, out)
    config = dict(FluxTransformer2DModel.load_config(out / "transformer"), guidance_embeds=True)
    torch.manual_seed(1)
    student = FluxTransformer2DModel.from_config(config)
    student.save_pretrained(out / flux.GUIDANCE_SUBFOLDER)
    lora.add_adapters(student, rank=2, alpha=2, targets=flux.LORA_TARGETS)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    meta = {"method": "icd", "boundaries": Boundaries.preset("4step-1").to_dict(), "w_set": [0.0], "tau": None,
            "rank": 2, "alpha": 2, "targets": list(flux.LORA_TARGETS)}
    lora.save_adapters(student, out / "icd", meta)
    return out


# ---------------------------------------------------------------------------------------------- bytes from headers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_folder_bytes_equal_the_loaded_tensors(tiny_flux_folder, dtype):
    parts = memory.folder_bytes(tiny_flux_folder, dtype)
    assert set(parts) == {"text_encoder", "text_encoder_2", "vae", "transformer"}
    assert parts == {c: loaded_bytes(tiny_flux_folder / c, dtype) for c in parts}


def test_sharded_weights_count_every_shard_and_a_variant_beside_counts_once(tiny_flux_folder, tmp_path):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_flux_folder, folder)
    shutil.rmtree(folder / "transformer")
    FluxTransformer2DModel.from_pretrained(tiny_flux_folder / "transformer").save_pretrained(
        folder / "transformer", max_shard_size="100KB")
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    save_file({"w": torch.zeros(3, 5, dtype=torch.float16)}, str(folder / "transformer" / "extra.safetensors"))
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors",
                folder / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    original, parts = memory.folder_bytes(tiny_flux_folder, torch.float32), memory.folder_bytes(folder, torch.float32)
    assert parts == {**original, "transformer": original["transformer"] + 15 * 4}  # every shard, the extra file
    assert parts["transformer"] == loaded_bytes(folder / "transformer", torch.float32)
    only_variant = tmp_path / "vae"  # a folder with only the fp16 variant: read as loading reads it
    only_variant.mkdir()
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.fp16.safetensors", only_variant)
    assert memory.weight_files(only_variant) == [only_variant / "diffusion_pytorch_model.fp16.safetensors"]


@pytest.mark.parametrize("t5", [True, False])
def test_an_sd3_folder_counts_t5_where_it_loads(tmp_path, t5):
    folder = sd3.build_random_pipeline(tmp_path / "sd3", vocabulary=world.vocabulary(), t5=t5)
    parts = memory.folder_bytes(folder, torch.bfloat16)
    assert set(parts) == {"text_encoder", "text_encoder_2", "vae", "transformer", *["text_encoder_3"] * t5}
    assert parts == {c: loaded_bytes(folder / c, torch.bfloat16) for c in parts}


def test_the_icd_path_counts_the_distilled_network_the_adapters_and_their_fused_copies(icd_folder):
    parts = memory.folder_bytes(icd_folder, torch.bfloat16, icd=True, fuse=True)
    assert set(parts) == {"text_encoder", "text_encoder_2", "vae", flux.GUIDANCE_SUBFOLDER, "icd", memory.FUSED}
    assert parts[flux.GUIDANCE_SUBFOLDER] == loaded_bytes(icd_folder / flux.GUIDANCE_SUBFOLDER, torch.bfloat16)
    assert parts["icd"] == loaded_bytes(icd_folder / "icd", torch.bfloat16)
    student = FluxTransformer2DModel.from_pretrained(icd_folder / flux.GUIDANCE_SUBFOLDER)
    lora.attach_adapters(student, icd_folder / "icd")
    fused = lora.FusedAdapters(student)  # what a fused load makes: one copy of the adapted weights per adapter
    copies = sum(w.to(torch.bfloat16).nbytes for name in lora.ADAPTERS for w in fused.weights[name])
    assert parts[memory.FUSED] == copies
    assert memory.FUSED not in memory.folder_bytes(icd_folder, torch.bfloat16, icd=True)


# ---------------------------------------------------------------------------------------------- refusals
def test_a_cpu_load_beyond_the_available_ram_is_refused_in_one_line(tiny_flux_folder, monkeypatch):
    total = sum(memory.folder_bytes(tiny_flux_folder, torch.float32).values())
    need = int(total * (1 + memory.ACTIVATION_MARGIN))
    monkeypatch.setattr(memory, "available_ram", lambda: need)
    memory.check_fits(tiny_flux_folder, "cpu", torch.float32)  # exactly enough: passes
    monkeypatch.setattr(memory, "available_ram", lambda: need - 1)
    with pytest.raises(ModelError) as e:
        memory.check_fits(tiny_flux_folder, "cpu", torch.float32, "model", name="tiny-flux")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("tiny-flux needs ")
    for text in (memory.format_bytes(need), memory.format_bytes(need - 1), memory.format_bytes(total), "--offload"):
        assert text in msg, text
    with pytest.raises(ModelError, match="unknown offload 'disk'"):
        memory.check_fits(tiny_flux_folder, "cpu", torch.float32, "disk")


def test_a_cuda_load_names_the_first_option_that_fits(tiny_flux_folder, monkeypatch):
    """The CUDA arithmetic with the driver's answer patched (no GPU here): free memory between the modes' needs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory, "available_ram", lambda: 2**40)
    folder, bf16, fp32 = tiny_flux_folder, torch.bfloat16, torch.float32

    def need(mode, dtype=bf16):
        return int(memory.device_bytes(folder, dtype, mode) * (1 + memory.ACTIVATION_MARGIN))

    assert need("none") > need("model") > need("sequential")
    assert memory.device_bytes(folder, bf16, "model") == max(memory.folder_bytes(folder, bf16).values())
    for dtype, free, offload, advice in (
            (bf16, need("none"), "none", None),
            (bf16, need("none") - 1, "none", "use --offload model (needs"),
            (bf16, need("model") - 1, "none", "use --offload sequential (needs"),
            (bf16, need("model") - 1, "model", "use --offload sequential (needs"),
            (bf16, need("sequential"), "sequential", None),
            (bf16, need("sequential") - 1, "none", "even --offload sequential needs"),
            (fp32, need("none"), "none", "use --dtype bf16 (needs"),  # from fp32: bf16 at the same offload first
            (fp32, need("sequential") - 1, "none", "even --offload sequential --dtype bf16 needs")):
        monkeypatch.setattr(memory, "cuda_free", lambda device, free=free: free)
        if advice is None:
            memory.check_fits(folder, "cuda:0", dtype, offload)
            continue
        with pytest.raises(ModelError) as e:
            memory.check_fits(folder, "cuda:0", dtype, offload, name="tiny")
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and msg.startswith("tiny needs ") and advice in msg, msg
        assert f"{memory.format_bytes(need(offload, dtype))} on cuda:0" in msg
        assert f"but {memory.format_bytes(free)} is free" in msg
    monkeypatch.setattr(memory, "available_ram", lambda: 1)  # the loader holds every weight in RAM first
    with pytest.raises(ModelError, match="of RAM while they load"):
        memory.check_fits(folder, "cuda:0", fp32, "model")


def test_from_pretrained_refuses_before_any_weight_loads(tiny_flux_folder, monkeypatch):
    monkeypatch.setattr(memory, "available_ram", lambda: 1)

    def never(*args, **kwargs):
        raise AssertionError("a weight loaded before the check")

    monkeypatch.setattr("icd.pipeline.load_model", never)
    with pytest.raises(ModelError, match="--offload"):
        Pipeline.from_pretrained(tiny_flux_folder, offload="model")
    with pytest.raises(ModelError, match="cannot be combined with --compile"):
        Pipeline.from_pretrained(tiny_flux_folder, offload="model", compile="default")


# ---------------------------------------------------------------------------------------------- offload on the CPU
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_on_the_cpu_changes_no_image(tiny_flux_folder, tiny_flux_pipe, case, mode):
    pipe = Pipeline.from_pretrained(tiny_flux_folder, offload=mode)
    model = pipe.model
    assert memory.offload_mode(model) == mode and model.device == torch.device("cpu")
    assert all(hasattr(getattr(model, c), "_hf_hook") for c in ("text_encoder", "text_encoder_2", "unet", "vae"))
    for method in ("flow-ode", "fireflow"):
        runs = [p.edit(p.invert(case.source[None], [case.source_prompt], method=method, steps=4),
                       [case.target_prompt]) for p in (tiny_flux_pipe, pipe)]
        assert runs[0].nfe == runs[1].nfe
        assert (runs[0].images == runs[1].images).all(), method
    gen = [p.generate([case.target_prompt], method="ddim", steps=2).images for p in (tiny_flux_pipe, pipe)]
    torch.testing.assert_close(gen[0], gen[1], rtol=0, atol=0)


def test_offload_unfuses_the_adapters_and_the_lazy_base_joins_its_group(icd_folder, case):
    plain = Pipeline.from_pretrained(icd_folder, fuse=False)
    pipe = Pipeline.from_pretrained(icd_folder, offload="model")
    assert pipe.model.icd is not None and pipe.model.fused is None and plain.model.fused is None
    runs = [p.edit(p.invert(case.source[None], [case.source_prompt]), [case.target_prompt]) for p in (plain, pipe)]
    assert runs[1].nfe == 4 and (runs[0].images == runs[1].images).all()
    base = pipe.base()  # the original transformer, loaded lazily: offloaded with the same group
    assert memory.offload_mode(base) == "model" and base.unet is not pipe.model.unet
    assert base.unet in pipe.model.unet._hf_hook.group and pipe.model.vae in base.unet._hf_hook.group
    runs = [p.edit(p.invert(case.source[None], [case.source_prompt], method="flow-ode", steps=4),
                   [case.target_prompt]) for p in (plain, pipe)]
    assert (runs[0].images == runs[1].images).all()


# ---------------------------------------------------------------------------------------------- the command line
def test_the_cli_offloads_and_refuses_a_load_that_cannot_fit_with_exit_2(tiny_flux_folder, case, tmp_path, capsys,
                                                                         monkeypatch):
    assert common.OFFLOAD_MODES == memory.OFFLOAD_MODES  # the light copy the parser shows
    src = tmp_path / "src.png"
    save_image(case.source, src)
    args = ["edit", str(src), "--model", str(tiny_flux_folder), "--method", "flow-ode", "--steps", "4", "--source",
            case.source_prompt, "--target", case.target_prompt]
    assert main([*args, "--offload", "model", "-o", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    capsys.readouterr()
    monkeypatch.setattr(memory, "available_ram", lambda: 2**20)
    assert main([*args, "--offload", "sequential", "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("icd: error: ") and "--offload" in err[0], err
    assert f"but {memory.format_bytes(2**20)} is available" in err[0] and not (tmp_path / "b.png").exists()
