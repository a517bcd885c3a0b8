"""Time the flow-model editing paths at the real architectures with random weights: a FLUX.1-dev-shaped and an
SD3.5-medium-shaped pipeline at 1024x1024, one source image and one target prompt (batch 1 source + 1 target).

No FLUX or SD3 weights can be downloaded here, and speed does not depend on the weights' values, so the networks are
the published architectures randomly initialised (the configs below are the published ``config.json`` files of
black-forest-labs/FLUX.1-dev and stabilityai/stable-diffusion-3.5-medium):

- **transformer**: the published config exactly (FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128,
  ``guidance_embeds``, 12 B parameters; SD3.5-medium: 24 blocks, 24 heads x 64, ``attn2`` in blocks 0-12, RMS QK
  norms, 2.2 B parameters);
- **VAE**: the published config (16 latent channels, block_out_channels 128/256/512/512, 2 layers per block, no
  quant convs; FLUX's and SD3's scale and shift);
- **text encoders**: small stand-ins (one or two layers, narrow) that give the real *shapes* the transformer reads:
  T5 tokens [B, 512, 4096] for FLUX and [B, 256, 4096] for SD3, CLIP at 77 positions (SD3's joint sequence is
  77 + 256 = 333 text tokens), pooled widths 768 (FLUX) and 768 + 1280 = 2048 (SD3). The real T5-XXL (4.7 B) and
  CLIPs run once per prompt batch per edit, not once per step (a T5-XXL forward at 512 tokens is ~5 TFLOP per
  prompt: tens of milliseconds on an H100), so the rows below under-state an edit by about that much and no more.

The models are built in memory, directly on the device in the run's dtype (``with torch.device(...)`` and the
default dtype set to it: random init of 12 B parameters takes seconds there, a CPU init and copy minutes), and wrapped
in the library's own model classes (`icd.models.flux.FluxDiffusion`, `icd.models.sd3.SD3Diffusion`, with the
schedules `flux.schedule_for` / `sd3.schedule_for` give a loaded folder) and an `icd.pipeline.Pipeline`. Writing the
folder first and loading it with `Pipeline.from_pretrained` would serialise ~24 GB (FLUX) per run, and
`icd.models.flux_embedded` / `icd.models.sd3`'s random-folder builders have no knobs for the full-size text widths,
latent channels and VAE. Everything above the model (`Pipeline.invert` / `edit`, the methods, the adapters, the NFE
counter) is the library's code as `from_pretrained` would give it.

iCD adapters: random rank-64 LoRA pairs (``rev_cd``, ``fwd_cd``, alpha 64) on the family's `LORA_TARGETS`, boundaries
``4step-1`` (tau 0.8), as ``icd/adapters.json`` would record them, fused (`icd.models.lora.FusedAdapters`, the
library's default) when the estimated weights + 10 GiB fit the device (``--fuse auto``; FLUX.1-dev fused: 67.6 GiB
of weights in bf16), else peft's LoRA branches. One transformer serves every row: the baselines run it with the
original weights active (the pipeline's base model shares the fused-adapter switch), so nothing is held twice (a
FLUX.1-dev folder loaded by `from_pretrained` would hold a second 22 GiB transformer for the baselines).

- **FLUX.1-dev** already embeds its guidance (``guidance_embeds``): it is its own guidance-distilled network, as
  `icd.models.loading.guidance_subfolder` picks ``transformer/`` for it; the adapters sit on it, and every row's
  guidance is one call (the embedded scale).
- **SD3.5**: diffusers' SD3 transformer has no guidance input, and no trained guidance-distilled SD3.5 student or
  iCD adapters exist. Its ``icd`` row is a **cost proxy, not a trained method**: iCD's own 4 + 4 path (the
  pipeline's ``icd`` method, fused adapters, the same calls at batch 1 and 2) on the SD3.5-medium transformer with
  the edit's guidance code 0, i.e. one call per step as a guidance-distilled student would make, with the two-pass
  CFG a plain SD3 would need omitted (a student's guidance embedding, a small MLP on the pooled text vector, is
  omitted too: negligible beside the transformer). The row says so in its ``proxy`` field. The SD3 baselines run
  two-pass CFG (their guided calls carry 2x the rows).

Rows per family, in this order (the order of importance, for ``--max-minutes``); every row inverts the source and
edits it with the prompt swap (no Prompt-to-Prompt: ``EditControls(p2p=None)``; SD3 refuses P2P), timed from uint8
image to uint8 edit (text encoding, VAE encode, network calls, VAE decode, conversion), each stage edge synchronised:

- ``flow-ode`` 28 + 28: Euler flow-ODE inversion (unguided) and decoding of [source, target] (guided: FLUX's
  embedded scale, SD3's two-pass CFG). The reference of ``ratio_to_flow_ode``.
- ``icd`` 4 + 4: 4 forward-adapter calls at batch 1, 4 reverse-adapter calls at batch 2 (SD3: the proxy above).
- ``flowedit``: FlowEdit at its defaults (28-step grid, 24 calls, each on [source, target] rows; no inversion).
- ``rf-inversion`` 28 + 28: RF-Inversion at its defaults (gamma 0.5, eta 0.9 over the first 7 reverse steps).

Per row: ``--warmups`` untimed runs (the baselines at ``--warmup-steps`` steps: the same shapes and code paths, a
fraction of the time; iCD at its 4 + 4), then ``--repeats`` timed runs: ``total_s`` / ``invert_s`` / ``edit_s``
medians and ``*_min_s`` minima; ``nfe_invert``, ``nfe_edit``, ``nfe`` (the model's NFE counter, one per network call
however many rows), ``rows_per_call`` (calls per batch size: two-pass CFG shows as doubled rows), ``peak_gib`` (the
CUDA allocator's peak since the row began, weights included; on a CPU the process's peak resident set), and
``ratio_to_flow_ode`` (seconds median / min and NFE over the same family's flow-ode 28 + 28). The JSON (``--out``) is
rewritten after every row and timed run (``running`` names what is in progress), so a run stopped from outside keeps
what it measured. ``--max-minutes`` (whole run) and ``--family-minutes`` (per family, from its start) stop new rows
and new timed runs. Progress: stderr.

    python benchmarks/flow_timing.py --device cuda --out flow_timing.json          # both families, bf16, 1024x1024
    python benchmarks/flow_timing.py --device cpu --scale 24 --image-size 64 --repeats 1 --warmups 0 \\
        --out t.json                                                                # CPU smoke (tests/)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from icd import world
from icd.bench.runtime import describe_device
from icd.boundaries import Boundaries
from icd.editing.edit import EditControls
from icd.io import write_text_atomic
from icd.models import flux, lora, sd3
from icd.models import flux_embedded as fe
from icd.models.base import ICDSpec
from icd.models.loading import BOUNDARY_TAU
from icd.models.tokenizer import write_tokenizer
from icd.pipeline import Pipeline
from icd.runtime import resolve_dtype, synchronize

# ---------------------------------------------------------------------------------------------------- the configs
# The published configs (diffusers' config.json of each repository's subfolder), as diffusers builds them.
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-dev, vae/config.json
FLUX_DEV_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611,
    shift_factor=0.1159, latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=False,
    use_post_quant_conv=False, mid_block_add_attention=True,
)
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# stabilityai/stable-diffusion-3.5-medium, vae/config.json
SD35_MEDIUM_VAE = dict(FLUX_DEV_VAE, scaling_factor=1.5305, shift_factor=0.0609)
SD3_SHIFT = 3.0  # stabilityai/stable-diffusion-3.5-medium, scheduler/scheduler_config.json (static shift)
# The text the transformers read (the pipelines' defaults): T5 tokens and their width, CLIP positions, pooled widths
TEXT = {"flux": dict(t5_length=flux.T5_LENGTH, t5_width=4096, clip_length=77, pooled=(768,)),
        "sd3": dict(t5_length=sd3.T5_LENGTH, t5_width=4096, clip_length=77, pooled=(768, 1280))}
FAMILIES = ("flux", "sd3")
NAMES = {"flux": "FLUX.1-dev-shaped (random)", "sd3": "SD3.5-medium-shaped (random)"}
STEPS = 28  # flow-ode / rf-inversion steps each way (the RF-Inversion and FlowEdit references' count)
METHODS = ("flow-ode", "icd", "flowedit", "rf-inversion")  # the rows, in their order of importance
ICD_RANK = 64
ICD_BOUNDARIES = "4step-1"
FUSE_MARGIN_GIB = 10.0  # activations (VAE decode of two 1024² images in bf16: a few GiB) and the allocator's slack
SD3_ICD_PROXY = ("cost proxy, not a trained method: iCD's 4+4 path (random fused adapters) on the SD3.5-medium "
                 "transformer with edit guidance code 0 -- one call per step as a guidance-distilled student would "
                 "make; diffusers' SD3 has no guidance input, so two-pass CFG (and a student's small guidance-"
                 "embedding MLP) is omitted")


def _timing_module():
    """benchmarks/sd_shaped_timing.py (its clock, peak-memory and error helpers), loaded by path: benchmarks are
    scripts."""
    path = Path(__file__).with_name("sd_shaped_timing.py")
    spec = importlib.util.spec_from_file_location("sd_shaped_timing", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T = _timing_module()
Clock, peak_gib, reset_peak, describe_error, loadavg = T.Clock, T.peak_gib, T.reset_peak, T.describe_error, T.loadavg


def scaled(family: str, scale: int, image_size: int) -> dict:
    """The family's transformer and VAE configs and text widths, every width and block count divided by `scale`
    (1: the published configs; a CPU smoke test divides by ~24: one block of each kind, one head)."""
    text = dict(TEXT[family])

    def div(n: int, lo: int = 1) -> int:
        return max(lo, n // scale)

    vae = dict(FLUX_DEV_VAE if family == "flux" else SD35_MEDIUM_VAE, sample_size=image_size)
    if scale > 1:  # channels stay multiples of the 32 GroupNorm groups
        vae["block_out_channels"] = tuple(max(32, c // scale // 32 * 32) for c in vae["block_out_channels"])
        text["t5_width"] = div(text["t5_width"])
        text["pooled"] = tuple(div(p) for p in text["pooled"])
    if family == "flux":
        t = dict(FLUX_DEV_TRANSFORMER)
        if scale > 1:
            t.update(num_layers=div(t["num_layers"]), num_single_layers=div(t["num_single_layers"]),
                     num_attention_heads=div(t["num_attention_heads"]))
        t.update(joint_attention_dim=text["t5_width"], pooled_projection_dim=sum(text["pooled"]))
    else:
        t = dict(SD35_MEDIUM_TRANSFORMER)
        if scale > 1:
            layers, heads = div(t["num_layers"]), div(t["num_attention_heads"])
            dual = min(layers, math.ceil(len(t["dual_attention_layers"]) * layers / t["num_layers"]))
            t.update(num_layers=layers, num_attention_heads=heads, dual_attention_layers=tuple(range(dual)),
                     caption_projection_dim=heads * t["attention_head_dim"])
        t.update(joint_attention_dim=text["t5_width"], pooled_projection_dim=sum(text["pooled"]))
    return {"transformer": t, "vae": vae, "text": text}


@contextlib.contextmanager
def init_on(device: torch.device, dtype: torch.dtype):
    """Modules created in the block are created on `device` in `dtype` (parameters and float buffers)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` in `dtype`, moved or cast only where a tensor is not (they were created there)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.device != device for t in tensors):
        module.to(device)
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        module.to(dtype=dtype)
    return module


def clip_tokenizer(directory: Path, length: int) -> CLIPTokenizer:
    """The world's one-token-per-word CLIP tokenizer at `length` positions (77: CLIP's)."""
    write_tokenizer(directory, world.vocabulary(), max_length=length)
    return CLIPTokenizer.from_pretrained(str(directory))


def clip_encoder(tokenizer: CLIPTokenizer, *, width: int, projection: int | None, length: int):
    """A 2-layer, one-head CLIP text encoder of hidden width `width` (FLUX reads its pooled output: `width` is the
    pooled width) or, with `projection`, a `CLIPTextModelWithProjection` (SD3: pooled = the projection)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=256,
                            projection_dim=projection or width, num_hidden_layers=2, num_attention_heads=1,
                            max_position_embeddings=length, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_encoder(tokenizer, width: int) -> T5EncoderModel:
    """A one-layer T5 encoder of output width `width` (the transformer's joint_attention_dim), 2 heads x 64, FF 256."""
    config = fe.t5_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.update(d_model=width, d_kv=64, d_ff=256, num_layers=1, num_heads=2)
    return T5EncoderModel(T5Config(**config))


def add_random_adapters(transformer, targets, *, seed: int) -> None:
    """Both iCD adapters (rank `ICD_RANK`, alpha = rank) on `targets`, with random A and B (peft zeroes B)."""
    lora.add_adapters(transformer, rank=ICD_RANK, alpha=ICD_RANK, targets=targets, seed=seed)
    gen = torch.Generator(device=next(transformer.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 1e-3, generator=gen)
    transformer.requires_grad_(False)


def fuse_choice(mode: str, transformer, targets, device: torch.device, dtype: torch.dtype) -> tuple[bool, dict]:
    """(fuse the adapters?, the memory estimate behind it): ``auto`` fuses on a CPU, and on a GPU when the fused
    layout's weights (`lora.fused_memory`) + `FUSE_MARGIN_GIB` fit the device's memory."""
    est = lora.fused_memory(transformer, targets, rank=ICD_RANK, bytes_per_param=torch.finfo(dtype).bits // 8)
    info = {k: round(v / 2**30, 2) for k, v in est.items() if k in ("base", "fused_copies", "peft")}
    if device.type == "cuda":
        info["device_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)
    if mode != "auto":
        return mode == "on", info
    return device.type != "cuda" or info["fused_copies"] + FUSE_MARGIN_GIB <= info["device_gib"], info


def build(family: str, args, tmp: Path, device: torch.device, dtype: torch.dtype) -> tuple[Pipeline, dict]:
    """The family's pipeline (module docstring) and what the report records of it."""
    cfg = scaled(family, args.scale, args.image_size)
    text = cfg["text"]
    torch.manual_seed(0)
    clip_tok = clip_tokenizer(tmp / "clip", text["clip_length"])
    t5_tok = fe.build_t5_tokenizer(tmp / "t5", world.vocabulary())
    with init_on(device, dtype):
        vae = AutoencoderKL(**cfg["vae"])
        t5 = t5_encoder(t5_tok, text["t5_width"])
        if family == "flux":
            transformer = FluxTransformer2DModel(**cfg["transformer"])
            clip = clip_encoder(clip_tok, width=text["pooled"][0], projection=None, length=text["clip_length"])
        else:
            transformer = SD3Transformer2DModel(**cfg["transformer"])
            clips = [clip_encoder(clip_tok, width=64, projection=p, length=text["clip_length"])
                     for p in text["pooled"]]
    for m in (vae, t5, transformer, *([clip] if family == "flux" else clips)):
        place(m, device, dtype).eval().requires_grad_(False)
    vae_factor = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    common = dict(vae=vae, unet=transformer, image_size=args.image_size, vocabulary=None, name=NAMES[family])
    if family == "flux":  # as `flux.load` builds it from a folder
        base = flux.FluxDiffusion(tokenizer=clip_tok, text_encoder=clip, tokenizer_2=t5_tok, text_encoder_2=t5,
                                  schedule=flux.schedule_for(args.image_size, vae_factor),
                                  size_multiple=flux.SIZE_MULTIPLE, max_sequence_length=text["t5_length"], **common)
        targets = flux.LORA_TARGETS
    else:  # as `sd3.load` builds it from a folder
        base = sd3.SD3Diffusion(tokenizer=clip_tok, text_encoder=clips[0], tokenizer_2=clip_tok,
                                text_encoder_2=clips[1], tokenizer_3=t5_tok, text_encoder_3=t5,
                                schedule=sd3.schedule_for({"shift": SD3_SHIFT}),
                                size_multiple=vae_factor * int(transformer.config.patch_size),
                                max_sequence_length=text["t5_length"], **common)
        targets = sd3.LORA_TARGETS
    fuse, memory = fuse_choice(args.fuse, transformer, targets, device, dtype)
    with init_on(device, dtype):
        add_random_adapters(transformer, targets, seed=0)
    place(transformer, device, dtype)
    icd_model = base.with_unet(transformer)
    icd_model.icd = ICDSpec(path=Path("<random adapters, in memory>"), boundaries=Boundaries.preset(ICD_BOUNDARIES),
                            tau=BOUNDARY_TAU[ICD_BOUNDARIES], w_set=())
    if fuse:
        icd_model.fused = lora.FusedAdapters(transformer)
        base.fused = icd_model.fused  # the baselines' calls point the shared transformer at its original weights
    pipe = Pipeline(icd_model, base, family_defaults=True)  # the families' own guidance codes, as from a folder
    info = {"model": NAMES[family], "transformer_config": cfg["transformer"], "vae_config": cfg["vae"],
            "text": text, "text_encoders": "small stand-ins with the real token shapes (module docstring)",
            "params_transformer_b": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n) / 1e9,
            "params_lora_m": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n) / 1e6,
            "adapters": {"rank": ICD_RANK, "alpha": ICD_RANK, "boundaries": ICD_BOUNDARIES,
                         "tau": BOUNDARY_TAU[ICD_BOUNDARIES], "mode": "fused" if fuse else "peft",
                         "memory_gib": memory, "targets": list(targets)},
            "guidance_embedded": bool(base.guidance_distilled)}
    return pipe, info


# ---------------------------------------------------------------------------------------------------- rows
def edit_inputs(image_size: int):
    """One world scene rendered at `image_size`, its caption and the caption with the object recoloured."""
    scene = world.sample_scene(7, max_objects=1)
    color = scene.objects[0].color
    target = scene.caption.replace(color, "blue" if color != "blue" else "red", 1)
    return world.render(scene, image_size)[None], scene.caption, target


def row_plan(family: str) -> dict[str, dict]:
    """Per method: its steps (None: the adapters'), its controls, the expected (invert, edit) calls, a proxy note."""
    icd_controls = EditControls(p2p=None, guidance=0.0) if family == "sd3" else EditControls(p2p=None)
    return {
        "flow-ode": dict(steps=STEPS, label=f"{STEPS}+{STEPS}", controls=EditControls(p2p=None),
                         expected=(STEPS, STEPS)),
        "icd": dict(steps=None, label="4+4", controls=icd_controls, expected=(4, 4),
                    proxy=SD3_ICD_PROXY if family == "sd3" else None),
        "flowedit": dict(steps=STEPS, label=f"defaults ({STEPS}-step grid, 24 calls)", controls=EditControls(p2p=None),
                         expected=(0, 24)),
        "rf-inversion": dict(steps=STEPS, label=f"{STEPS}+{STEPS}", controls=EditControls(p2p=None),
                             expected=(STEPS, STEPS)),
    }


def run_once(pipe: Pipeline, inputs, method: str, steps: int | None, controls: EditControls,
             device: torch.device) -> dict:
    images, source, target = inputs
    model = pipe.model_for(method)
    calls0, n0 = model.counter.calls, len(model.counter.batch_sizes)
    synchronize(device)
    t0 = time.perf_counter()
    inv = pipe.invert(images, [source], method=method, steps=steps)
    synchronize(device)
    t1 = time.perf_counter()
    calls1 = model.counter.calls
    result = pipe.edit(inv, [target], controls)
    synchronize(device)
    t2 = time.perf_counter()
    rows = Counter(model.counter.batch_sizes[n0:])
    st = result.settings
    return {"invert_s": t1 - t0, "edit_s": t2 - t1, "total_s": t2 - t0, "nfe_invert": calls1 - calls0,
            "nfe_edit": result.nfe, "rows_per_call": {str(k): rows[k] for k in sorted(rows)},
            "edit_settings": None if st is None else {"guidance": st.guidance, "tau": st.tau, "steps": st.steps}}


def timed_row(pipe: Pipeline, family: str, method: str, args, device: torch.device, clock, inputs,
              save) -> dict:
    spec = row_plan(family)[method]
    row = {"family": family, "method": method, "steps": spec["label"], "control": spec["controls"].control,
           "device": describe_device(device), "loadavg": [loadavg()]}
    if spec.get("proxy"):
        row["proxy"] = spec["proxy"]
    if clock.expired():
        clock.log(f"{family} {method}: skipped (--max-minutes / --family-minutes)")
        return row | {"skipped": "--max-minutes / --family-minutes reached before this row"}
    warm_steps = None if spec["steps"] is None else min(args.warmup_steps, spec["steps"])
    runs: list[dict] = []
    reset_peak(device)  # once per row, before the warm-ups: never between timed runs
    try:
        row["warmup_s"] = []
        for k in range(args.warmups):
            save(running=f"{family} {method} warm-up {k + 1}")
            out = run_once(pipe, inputs, method, warm_steps, spec["controls"], device)
            row["warmup_s"].append(round(out["total_s"], 4))
            clock.log(f"{family} {method}: warm-up {k + 1}/{args.warmups} ({warm_steps or 'all'} steps) "
                      f"{out['total_s']:.2f} s")
        for k in range(args.repeats):
            if runs and clock.expired():
                clock.log(f"{family} {method}: stopping after {len(runs)} timed runs (--max-minutes)")
                break
            save(running=f"{family} {method} run {k + 1}")
            runs.append(run_once(pipe, inputs, method, spec["steps"], spec["controls"], device))
            clock.log(f"{family} {method}: run {k + 1}/{args.repeats} {runs[-1]['total_s']:.3f} s "
                      f"({runs[-1]['nfe_invert']}+{runs[-1]['nfe_edit']} calls)")
    except Exception as e:  # a row that fails (e.g. out of memory) is reported, the others still run
        row |= {"error": describe_error(e), "peak_gib_at_error": peak_gib(device)}
        clock.log(f"{family} {method}: {row['error']}")
    row["loadavg"].append(loadavg())
    if runs:
        last = runs[-1]
        for k in ("invert_s", "edit_s", "total_s"):
            vals = [r[k] for r in runs]
            row[k], row[f"{k.removesuffix('_s')}_min_s"] = statistics.median(vals), min(vals)
        row |= {"total_s_runs": [round(r["total_s"], 5) for r in runs], "runs": len(runs),
                "nfe_invert": last["nfe_invert"], "nfe_edit": last["nfe_edit"],
                "nfe": last["nfe_invert"] + last["nfe_edit"], "nfe_expected": sum(spec["expected"]),
                "rows_per_call": last["rows_per_call"], "edit_settings": last["edit_settings"],
                "peak_gib": peak_gib(device)}
    return row


def with_ratios(rows: list[dict]) -> None:
    """``ratio_to_flow_ode`` of every row: its seconds (median, min) and NFE over the family's flow-ode row."""
    ref = next((r for r in rows if r["method"] == "flow-ode" and "total_s" in r), None)
    for r in rows:
        if ref is None or "total_s" not in r:
            r["ratio_to_flow_ode"] = None
            continue
        r["ratio_to_flow_ode"] = {"total_s": r["total_s"] / ref["total_s"],
                                  "total_min_s": r["total_min_s"] / ref["total_min_s"],
                                  "nfe": r["nfe"] / ref["nfe"]}


def summary_line(r: dict) -> str:
    """One line per row (the log's and the GPU session's summary)."""
    if "total_s" not in r:
        return f"{r['family']} {r['method']} {r['steps']}: {r.get('error') or r.get('skipped') or 'no runs'}"
    ratio = r.get("ratio_to_flow_ode") or {}
    return (f"{r['family']} {r['method']} {r['steps']}: {r['total_s']:.3f} s median / {r['total_min_s']:.3f} s min "
            f"over {r['runs']}, NFE {r['nfe_invert']}+{r['nfe_edit']}={r['nfe']}, rows/call {r['rows_per_call']}, "
            f"peak {r['peak_gib'] or 0:.2f} GiB, x{ratio.get('total_s', float('nan')):.3f} of flow-ode"
            + (" [cost proxy]" if r.get("proxy") else ""))


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="flux,sd3", help="comma list of flux, sd3 (in the order run)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of rows: {', '.join(METHODS)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weights and compute (a CPU: fp32)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--scale", type=int, default=1, help="divide block counts, heads and widths (1: the real "
                    "architectures; a CPU smoke test: ~24 with --image-size 64)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (after --warmups)")
    ap.add_argument("--warmups", type=int, default=1, help="untimed runs before each row (0: a CPU test)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps of the baselines' warm-up runs")
    ap.add_argument("--fuse", default="auto", choices=["auto", "on", "off"],
                    help="fold the adapters into weight copies (auto: when they fit the device; module docstring)")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no row or timed run after this")
    ap.add_argument("--family-minutes", default="", help="per family, e.g. flux=5,sd3=2.5: no row or timed run of "
                    "that family starts this long after the family's build began")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    args.family = [f for f in args.family.split(",") if f]
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [f for f in args.family if f not in FAMILIES] + [m for m in args.methods if m not in METHODS]
    if bad or not args.family or not args.methods:
        ap.error(f"unknown or missing family / method: {bad}; families {FAMILIES}, methods {METHODS}")
    try:
        args.family_minutes = {k: float(v) for k, v in (p.split("=") for p in args.family_minutes.split(",") if p)}
    except ValueError:
        ap.error("--family-minutes: FAMILY=MINUTES[,FAMILY=MINUTES]")
    if args.scale < 1 or args.image_size % 16:
        ap.error("--scale must be >= 1 and --image-size a multiple of 16")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(args.dtype, device)
    t_start = time.perf_counter()
    deadline = None if args.max_minutes is None else t_start + 60 * args.max_minutes
    out = Path(args.out)
    report = {"script": "benchmarks/flow_timing.py", "device": describe_device(device), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "dtype": str(dtype).removeprefix("torch."),
              "image_size": args.image_size, "batch": "1 source + 1 target", "scale": args.scale, "weights": "random",
              "repeats": args.repeats, "warmups": args.warmups, "warmup_steps": args.warmup_steps,
              "max_minutes": args.max_minutes, "family_minutes": args.family_minutes, "fuse": args.fuse,
              "threads": torch.get_num_threads(), "loadavg_start": loadavg(), "running": None, "families": {}}

    def save(running: str | None = None) -> None:
        report["running"] = running  # set while a row runs: a run killed from outside shows which
        write_text_atomic(out, json.dumps(report, indent=1) + "\n")

    inputs = edit_inputs(args.image_size)
    for family in args.family:
        minutes = [m for m in (args.family_minutes.get(family),
                               None if deadline is None else (deadline - time.perf_counter()) / 60) if m is not None]
        clock = Clock(family, min(minutes) if minutes else None)
        entry = report["families"][family] = {"rows": []}
        if clock.expired():
            entry["skipped"] = "--max-minutes reached before this family"
            continue
        save(running=f"{family} build")
        clock.log(f"building {family} ({'real architecture' if args.scale == 1 else f'scale 1/{args.scale}'}) at "
                  f"{args.image_size}px, {report['dtype']} on {device}")
        pipe = None
        try:
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                pipe, info = build(family, args, Path(tmp), device, dtype)
            synchronize(device)
            entry |= info | {"build_s": time.perf_counter() - t0,
                             "peak_gib_after_build": peak_gib(device)}
            clock.log(f"built in {entry['build_s']:.1f} s: transformer {info['params_transformer_b']:.2f} B "
                      f"parameters, adapters {info['adapters']['mode']}")
        except Exception as e:  # a family that cannot be built (out of memory) is reported, the next one runs
            entry["error"] = describe_error(e)
            clock.log(f"{family} build: {entry['error']}")
        if pipe is not None:
            for method in args.methods:
                entry["rows"].append(timed_row(pipe, family, method, args, device, clock, inputs, save))
                with_ratios(entry["rows"])
                save()
                print(summary_line(entry["rows"][-1]), flush=True)
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = time.perf_counter() - t_start
    save()
    print(f"wrote {out}", flush=True)
    return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
