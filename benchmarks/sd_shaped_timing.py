"""Time the Stable Diffusion paths at full size with random weights: SD 1.5 at 512x512 or SDXL at 1024x1024 editing
(iCD 4+4 at batch 1 and 8, DDIM / NPI 50+50 and null-text inversion, all with Prompt-to-Prompt), optional
channels-last / torch.compile rows, and (SD 1.5) one iCD training step per precision setting.

No SD weights can be downloaded here, and speed does not depend on the weights' values, so the models are the
families' architectures randomly initialised (`icd.models.sd15`, `icd.models.sdxl`; the iCD adapters are rank-64
LoRA fused into their own weight copies, as `Pipeline.from_pretrained` loads the released files). They are built in
memory on the device (``--build memory``, the default): writing a full-size random pipeline to disk first
(``--build disk``: `icd.models.synthetic.write_pipeline` + `Pipeline.from_pretrained`, the loading path users run)
costs several GB of safetensors per run (SDXL: two 2.6 B-parameter UNets) and GPU-session minutes spent on
serialisation, not on the timings; the disk route is for small models (``--scale 10`` / ``--tiny``).

Editing rows, in this order (the order of importance, for ``--max-minutes``). Images: world scenes rendered at the
model's size, the edit recolours one object (P2P word swap), each image decoded as [source, target] in one batch
(batch 8: 16 rows); every row states seconds (invert, edit, total, per image), UNet calls, peak GPU memory, card:

- ``icd`` 4+4 at batch 1 and 8: ``--warmups`` untimed runs, then ``--repeats`` (default 5) timed runs: the median
  (``total_s``, ``invert_s``, ``edit_s``) and the min (``*_min``) of each, and per stage (``stages``: text, VAE
  encode, invert, decode, VAE decode, uint8 -- the time after the VAE decode until the edit returns -- each median
  and min; stage edges are timed with a device sync, a handful per edit);
- ``floor`` at each icd batch, in the same run and mode (``floor_ratio``: the edit over it): the bare network calls
  an edit cannot avoid -- a plain diffusers UNet of the iCD UNet's config (default SDPA processors, no adapters),
  ``segments`` calls at batch B (invert) and ``segments`` at 2B (decode), one text-encoder call at 2B, the VAE
  encode at B and decode at 2B, and the uint8 conversion on the device; inputs built before the clock starts;
- ``ddim`` / ``npi`` ``--steps``+``--steps`` (default 50+50, two-pass CFG), batch 1, ``--baseline-repeats`` runs;
- ``nti``: DDIM inversion, then null-text optimisation (per step up to 10 Adam steps with the NTI paper's early stop,
  `icd.editing.nulltext`), batch 1, one run. The library does not expose the inner-step count, so the row counts
  it: UNet calls whose text conditioning requires grad (``nti_inner_steps``; per timestep
  ``nti_inner_per_timestep``; ``nti_inner_cap`` = 10 per step). nfe_invert = steps + 2 x steps + inner steps.

A baseline's warm-up is a ``--warmup-steps`` run (same batch shapes and code paths, so kernels, lazy initialisation
and the allocator warm up the same; a 50+50 warm-up would double its cost). ``ratios``: seconds (total_s, batch 1)
of one method over another's, same card, same run (``icd/ddim50`` < 1, ``nti/icd`` > 1).

Every icd and floor row also counts the ATen operators of one untimed run (``aten_ops``, a dispatch-mode counter:
host work an eager call pays per operator) and records the 1-minute load average before and after it
(``loadavg``: the machine may be shared; take ``*_min`` as well as the median, and ``cpu_s``, the process's CPU
seconds, which waiting for a core does not inflate; ``--no-op-count`` drops that extra run; compiled rows have
none: under a dispatch mode dynamo gives up on the UNet and runs it eagerly from then on). Peak memory
(``peak_gib``: the CUDA allocator's peak on a GPU, the process's peak resident set on a CPU) is reset once per row,
before its warm-ups: the allocator is never emptied between timed runs.

``--channels-last`` / ``--compile MODE`` add icd rows on the same models right after the plain icd rows, before the
baselines (channels-last in place; compile on top of channels-last when both are given), each with
``speedup_vs_plain`` and the largest pixel difference of its edit from the plain row's. ``--compile`` is the
library's compiled path (`icd.models.compiled`, what ``icd edit --compile`` runs: MODE ``auto`` = reduce-overhead
with CUDA graphs on CUDA); its floor row compiles the plain UNet the same way. A compiled row
(``--compile-batches``, default batch 1: each static batch shape compiles its own graphs; ``--compile-baselines``:
ddim / npi / nti on the compiled original UNet too; ``--compile-pairs N``: then N alternating eager / compiled icd b1
runs, the per-pair ratio's median, for a shared machine) runs ``--compile-warmups`` untimed runs first and states the
graphs dynamo compiled and the graph breaks it met during warm-up and while timed (0 and 0: no compilation was
timed). Training rows (SD 1.5 only) come last, alone on the device.

``--cpu-user``: what a CPU-only user waits for an SD-1.5-architecture 512x512 edit on this CPU (threads:
``OMP_NUM_THREADS``): the iCD 4+4 P2P row and its floor (``--repeats``, default 3) and DDIM ``--steps``+``--steps``
with P2P timed once (after a 1+1-step warm-up), seconds and peak resident memory (the floor's plain UNet is the
original UNet here: one full-size UNet less in memory); ``--image-size`` / ``--scale`` smaller for a quick check.
``--max-minutes``: no row or timed run starts after that many minutes; the JSON is rewritten after every row
(``running`` names the row in progress), so a run stopped from outside keeps what it measured. Progress: stderr.

    python benchmarks/sd_shaped_timing.py --family sd15 --device cuda --out sd15.json
    python benchmarks/sd_shaped_timing.py --family sdxl --device cuda --skip train --out sdxl.json
    python benchmarks/sd_shaped_timing.py --device cpu --family sd15 --scale 10 --image-size 64 --repeats 1 \\
        --steps 2 --warmups 0 --skip train --out t.json                                                   # CPU smoke
    OMP_NUM_THREADS=1 python benchmarks/sd_shaped_timing.py --device cpu --family sd15 --scale 10 \\
        --image-size 64 --repeats 7 --skip b8,ddim,npi,nti,train --out proxy.json       # issue 36's CPU proxy
    python benchmarks/sd_shaped_timing.py --device cpu --family sdxl --tiny --image-size 64 --repeats 1 --steps 2 \\
        --warmups 0 --out t.json
    OMP_NUM_THREADS=1 python benchmarks/sd_shaped_timing.py --device cpu --family sd15 --scale 10 --image-size 64 \\
        --repeats 9 --warmups 2 --skip b8,ddim,npi,nti,train --compile default --out proxy-compiled.json
    OMP_NUM_THREADS=2 python benchmarks/sd_shaped_timing.py --cpu-user --out cpu-user-512.json   # the whole machine
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import diffusers
import numpy as np
import torch

from icd import world
from icd.bench.runtime import describe_device, sync
from icd.boundaries import Boundaries
from icd.editing.edit import EditControls
from icd.editing.nulltext import null_text_optimize
from icd.guidance import guidance_embedding
from icd.io import write_text_atomic
from icd.models import lora, sd15, sdxl
from icd.models.base import Cond, ICDSpec
from icd.models.compiled import CompiledUNet, compiled_graphs, graph_breaks
from icd.models.tiny import scheduler_config
from icd.pipeline import Pipeline
from icd.runtime import Precision, ProcessGroup, resolve_dtype
from icd.schedule import NoiseSchedule
from icd.train.icd import ICDConfig
from icd.train.icd_step import Batch, adapter_optimizers, batch_draws, training_step

FAMILIES = {"sd15": sd15, "sdxl": sdxl}
NTI_INNER = inspect.signature(null_text_optimize).parameters["inner_steps"].default  # "up to 10" (the paper's)
PARTS = ("edit", "b8", "ddim", "npi", "nti", "train")


def describe_error(e: BaseException) -> str:
    """One line for a row that failed: the exception type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_gib(device: torch.device) -> float | None:
    """Peak memory since the last `reset_peak`: the CUDA allocator's on a GPU, the process's peak resident set
    (VmHWM: weights, activations, everything the user's machine must hold) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    hwm = _proc_status("VmHWM")
    return None if hwm is None else hwm / 2**30


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:  # Linux: writing 5 to clear_refs resets VmHWM to the current resident set
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


class Clock:
    """Progress lines on stderr, stamped with the seconds since the start, and the --max-minutes deadline."""

    def __init__(self, label: str, max_minutes: float | None):
        self.label, self.t0 = label, time.perf_counter()
        self.deadline = None if max_minutes is None else self.t0 + 60.0 * max_minutes

    def log(self, msg: str) -> None:
        print(f"[{self.label} {time.perf_counter() - self.t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    def expired(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline


class CallWatch:
    """A forward pre-hook on a UNet: counts its calls per timestep, the calls whose text conditioning requires
    grad (null-text inversion's inner steps), and logs every `every` calls (the 50-step loops' progress)."""

    def __init__(self, unet, clock: Clock, every: int):
        self.clock, self.every, self.label = clock, every, ""
        self.reset()
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def reset(self) -> None:
        self.calls, self.grad_per_t = 0, Counter()

    def _hook(self, module, args, kwargs):
        self.calls += 1
        tokens = kwargs.get("encoder_hidden_states")
        if tokens is not None and tokens.requires_grad:
            t = args[1] if len(args) > 1 else kwargs.get("timestep")
            self.grad_per_t[int(torch.as_tensor(t).reshape(-1)[0])] += 1
        if self.every and self.calls % self.every == 0:
            self.clock.log(f"  {self.label}: {self.calls} UNet calls")


# ---------------------------------------------------------------------------------------------------- models
def sdxl_random_models(tokenizer_dir: Path, *, device, dtype: torch.dtype, tiny: bool, image_size: int,
                       rank: int = 64, seed: int = 0):
    """(base, icd) SDXL-shaped, as `sd15.random_models` builds SD 1.5 (no such helper in `icd.models.sdxl` yet):
    random components on `device`, the VAE in the model's dtype with its fp32 re-run of an overflowing batch (SDXL's
    force_upcast, as `sdxl.load` does; ``vae_upcasts`` in each row counts the re-runs), the distilled twin with both
    rank-`rank` adapters fused, boundaries 4step-2, tau 0.7."""
    parts = sdxl.random_components(tokenizer_dir, vocabulary=world.vocabulary(), tiny=tiny, image_size=image_size,
                                   device=device, dtype=dtype, seed=seed)
    vae = parts["vae"]
    base = sdxl.SDXLDiffusion(tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"],
                              text_encoder=parts["text_encoder"], text_encoder_2=parts["text_encoder_2"], vae=vae,
                              unet=parts["unet"], schedule=NoiseSchedule.from_scheduler_config(scheduler_config()),
                              name=f"sdxl-shaped-random{'/tiny' if tiny else ''}", image_size=image_size,
                              size_multiple=sdxl.SIZE_MULTIPLE)
    base.vae_upcast = bool(vae.config.force_upcast)
    icd = base.with_unet(parts["unet_guidance"])
    lora.add_adapters(icd.unet, rank=rank, alpha=rank, seed=seed)
    icd.unet.to(device=device, dtype=dtype).requires_grad_(False)
    icd.icd = ICDSpec(path=Path(tokenizer_dir), boundaries=Boundaries.preset(sdxl.BOUNDARIES), tau=sdxl.TAU,
                      w_set=(0.0,))
    icd.fused = lora.FusedAdapters(icd.unet)
    return base, icd


def build_pipeline(args, tmp: Path, device: torch.device, dtype: torch.dtype) -> Pipeline:
    if args.build == "disk":  # the loading path users run: diffusers folder + distilled UNet + released LoRA files
        from icd.models.synthetic import write_pipeline

        if args.family == "sd15" and args.scale not in (1, 10):
            raise SystemExit("--build disk writes SD 1.5 at --scale 1 or 10 only")
        tiny = args.tiny if args.family == "sdxl" else args.scale == 10
        files = write_pipeline(tmp / "pipe", args.family, vocabulary=world.vocabulary(), tiny=tiny,
                               image_size=args.image_size, rank=64)
        pipe = Pipeline.from_pretrained(files.pipeline, unet=files.unet, lora_forward=files.lora_forward,
                                        lora_reverse=files.lora_reverse, device=device, dtype=dtype)
        pipe.base()  # the original UNet loads lazily: now, not inside a timed row
        return pipe
    if args.family == "sdxl":
        base, icd = sdxl_random_models(tmp / "tok", device=device, dtype=dtype, tiny=args.tiny,
                                       image_size=args.image_size)
    else:
        base, icd = sd15.random_models(tmp / "tok", vocabulary=world.vocabulary(), device=device, dtype=dtype,
                                       scale=args.scale, image_size=args.image_size)
    return Pipeline(icd, base)


def set_memory_format(model, fmt: torch.memory_format) -> None:
    """The UNet's 4-D weights in `fmt`, including the fused adapters' weight copies (`FusedAdapters` swaps them into
    the layers; left contiguous, every adapter switch would undo channels-last on the adapted convolutions)."""
    model.unet.to(memory_format=fmt)
    fused = model.fused
    if fused is not None:
        for name, ws in fused.weights.items():
            fused.weights[name] = [w.contiguous(memory_format=fmt) if w.ndim == 4 else w for w in ws]
        fused.refresh() if hasattr(fused, "refresh") else fused.activate(fused.active)


def compile_models(pipe: Pipeline, floor_unet, *, mode: str, backend: str, part: str):
    """The library's compiled path (`icd.models.compiled`, what ``--compile`` / ``compile=`` give users): the iCD
    model's UNet (`part` ``icd``) or the original UNet (``baselines``) compiled for its no-grad calls; returns the
    floor's plain UNet behind the same wrapper (same mode, static shapes)."""
    (pipe.icd_model if part == "icd" else pipe.base()).compile(mode, backend=backend)
    return None if floor_unet is None else CompiledUNet(floor_unet, mode, backend=backend)


# ---------------------------------------------------------------------------------------------------- editing
@functools.lru_cache(maxsize=4)
def edit_inputs(image_size: int, batch: int) -> tuple[np.ndarray, list[str], list[str]]:
    """`batch` world scenes rendered at the model's size, their captions and a recolouring target for each."""
    scenes = [world.sample_scene(7 + i, max_objects=1) for i in range(batch)]
    targets = []
    for s in scenes:
        color = s.objects[0].color
        targets.append(s.caption.replace(color, "blue" if color != "blue" else "red", 1))
    return np.stack([world.render(s, image_size) for s in scenes]), [s.caption for s in scenes], targets


STAGES = ("text", "vae_encode", "invert", "decode", "vae_decode", "uint8")


def loadavg() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen operators dispatched while active (every op an eager call pays host time for)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class StageClock:
    """Times the model-level stages of an edit (text encoding, VAE encode, VAE decode) by wrapping those methods on
    the model instances, each edge with a device sync; the other stages are what remains of invert / edit."""

    WRAPPED = {"encode_prompt": "text", "encode_images": "vae_encode", "decode_latents": "vae_decode"}

    def __init__(self, models, device: torch.device):
        self.device, self.events, self.models = device, [], list({id(m): m for m in models}.values())

    def __enter__(self):
        for m in self.models:
            for method, stage in self.WRAPPED.items():
                setattr(m, method, self._timed(getattr(m, method), stage))
        return self

    def __exit__(self, *exc):
        for m in self.models:
            for method in self.WRAPPED:
                m.__dict__.pop(method, None)

    def _timed(self, fn, stage):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.events.append((stage, t0, time.perf_counter()))
            return out

        return timed

    def stages(self, t0: float, t1: float, t2: float) -> dict[str, float]:
        """Seconds per stage of one run: invert from t0 to t1, edit from t1 to t2."""
        def within(stage, a, b):
            return [(s, e) for name, s, e in self.events if name == stage and a <= s and e <= b]

        text_inv, text_edit = (sum(e - s for s, e in within("text", a, b)) for a, b in ((t0, t1), (t1, t2)))
        enc, dec = within("vae_encode", t0, t1), within("vae_decode", t1, t2)
        dec_start, dec_end = (dec[0][0], dec[-1][1]) if dec else (t2, t2)
        return {"text": text_inv + text_edit, "vae_encode": sum(e - s for s, e in enc),
                "invert": (t1 - t0) - text_inv - sum(e - s for s, e in enc),
                "decode": (dec_start - t1) - text_edit, "vae_decode": sum(e - s for s, e in dec),
                "uint8": t2 - dec_end}


def run_once(pipe: Pipeline, inputs, method: str, steps: int | None, device: torch.device,
             counter: OpCounter | None = None) -> dict:
    images, sources, targets = inputs
    model = pipe.model_for(method)
    calls0 = model.counter.calls
    with StageClock([pipe.model, model], device) as clock, (counter or contextlib.nullcontext()):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        inv = pipe.invert(images, sources, method=method, steps=steps)
        sync(device)
        t1 = time.perf_counter()
        calls1 = model.counter.calls
        result = pipe.edit(inv, targets, EditControls())
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
    return {"invert_s": t1 - t0, "edit_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0, "nfe_invert": calls1 - calls0,
            "nfe_edit": result.nfe, "images": result.images, "stages": clock.stages(t0, t1, t2)}


class Floor:
    """The bare calls an iCD edit of `batch` images cannot avoid (see the module docstring), on a plain diffusers
    UNet of the iCD UNet's config and the pipeline's own text encoder and VAE; every input built on the device once."""

    def __init__(self, pipe: Pipeline, batch: int, image_size: int, device: torch.device, unet=None):
        from diffusers import UNet2DConditionModel

        model = pipe.icd_model
        self.model, self.device, self.unet = model, device, unet
        if unet is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.unet = UNet2DConditionModel(**model.unet.config).to(device=device, dtype=model.dtype).eval()
            self.unet.requires_grad_(False)
        self.call = self.unet  # the UNet call (a `CompiledUNet` in the compiled rows)
        b = model.icd.boundaries
        self.t_inv = [torch.full((batch,), int(t), device=device) for t in b.forward_schedule()[:-1]]
        self.t_dec = [torch.full((2 * batch,), int(t), device=device) for t in b.reverse_schedule()[:-1]]
        c, h, w = model.latent_shape(image_size, image_size)
        gen = torch.Generator().manual_seed(0)
        self.x1 = torch.randn(batch, c, h, w, generator=gen).to(device, model.dtype)
        self.x2 = torch.randn(2 * batch, c, h, w, generator=gen).to(device, model.dtype)
        self.image = (torch.rand(batch, 3, image_size, image_size, generator=gen) * 2 - 1).to(device, model.vae.dtype)
        _, sources, targets = edit_inputs(image_size, batch)
        self.ids = model.token_ids(model.tokenizer, [*sources, *targets])
        tokens = model.encode_prompt([*sources, *targets]).tokens
        self.tok1, self.tok2 = tokens[:batch].contiguous(), tokens
        self.kwargs1, self.kwargs2 = self._extra(batch, self.tok1), self._extra(2 * batch, self.tok2)

    def _extra(self, n: int, tokens: torch.Tensor) -> dict:
        """timestep_cond (and SDXL's added_cond_kwargs) for `n` rows, built now."""
        kw = {}
        if self.unet.config.time_cond_proj_dim is not None:
            kw["timestep_cond"] = guidance_embedding(torch.zeros(n), self.unet.config.time_cond_proj_dim).to(
                self.device, self.model.dtype)
        if self.unet.config.addition_embed_type == "text_time":
            from icd.models.base import Cond

            cond = self.model.encode_prompt([""] * n)
            kw |= self.model.unet_kwargs(Cond(tokens=tokens, pooled=cond.pooled), self.x1 if n == len(self.x1) else
                                         self.x2)
        return kw

    @torch.no_grad()
    def run(self, counter: OpCounter | None = None) -> dict:
        m, dev, times = self.model, self.device, {}
        with counter or contextlib.nullcontext():
            sync(dev)
            t, c0 = time.perf_counter(), time.process_time()

            def lap(stage):
                nonlocal t
                sync(dev)
                now = time.perf_counter()
                times[stage] = now - t
                t = now

            m.text_encoder(self.ids)  # SDXL's second encoder is not in the floor (SD 1.5 proxy)
            lap("text")
            self.latent = m.vae.encode(self.image).latent_dist.mean
            lap("vae_encode")
            for ts in self.t_inv:
                self.call(self.x1, ts, encoder_hidden_states=self.tok1, **self.kwargs1)
            lap("invert")
            for ts in self.t_dec:
                self.call(self.x2, ts, encoder_hidden_states=self.tok2, **self.kwargs2)
            lap("decode")
            img = m.vae.decode(self.x2.to(m.vae.dtype)).sample
            lap("vae_decode")
            ((img.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            lap("uint8")
        cpu, total = time.process_time() - c0, sum(times.values())
        return {"invert_s": times["text"] / 2 + times["vae_encode"] + times["invert"],
                "edit_s": times["text"] / 2 + times["decode"] + times["vae_decode"] + times["uint8"],
                "total_s": total, "cpu_s": cpu, "stages": times}


def summarise(row: dict, runs: list[dict]) -> dict:
    """Median (``total_s``, ...) and min (``total_s_min``, ...) over the timed runs, per stage too."""
    out = {}
    for k in ("invert_s", "edit_s", "total_s", "cpu_s"):
        vals = [r[k] for r in runs]
        out[k], out[f"{k.removesuffix('_s')}_min_s"] = statistics.median(vals), min(vals)
    out["total_s_runs"] = [round(r["total_s"], 5) for r in runs]
    out["stages"] = {st: {"median_s": statistics.median(r["stages"][st] for r in runs),
                          "min_s": min(r["stages"][st] for r in runs)} for st in STAGES}
    return row | out


def floor_row(floor: Floor, device: torch.device, clock: Clock, *, batch: int, warmups: int, repeats: int,
              variant: str = "plain", count_ops: bool = True) -> dict:
    name = f"floor b{batch}" + ("" if variant == "plain" else f" [{variant}]")
    row = {"method": "floor", "variant": variant, "batch": batch, "device": describe_device(device),
           "loadavg": [loadavg()]}
    if clock.expired():
        return row | {"skipped": "--max-minutes reached before this row"}
    reset_peak(device)
    for _ in range(warmups):
        floor.run()
    counter = OpCounter()
    if count_ops:
        floor.run(counter)
    graphs0, breaks0 = compiled_graphs(), graph_breaks()
    runs = []
    for k in range(repeats):
        if runs and clock.expired():
            break
        runs.append(floor.run())
        clock.log(f"{name}: run {k + 1}/{repeats} {runs[-1]['total_s']:.4f} s")
    row["loadavg"].append(loadavg())
    if "compile" in variant:
        row |= {"graphs_compiled_while_timed": compiled_graphs() - graphs0,
                "graph_breaks_while_timed": graph_breaks() - breaks0}
    row = summarise(row, runs)
    return row | {"per_image_s": row["total_s"] / batch, "runs": len(runs),
                  "aten_ops": counter.ops if count_ops else None, "peak_gib": peak_gib(device)}


def edit_row(pipe: Pipeline, device: torch.device, clock: Clock, watch: CallWatch | None, *, method: str,
             batch: int, steps: int | None, warmups: int, warmup_steps: int | None, repeats: int,
             variant: str = "plain", image_size: int, count_ops: bool = True) -> dict:
    """One row: `warmups` untimed runs (at `warmup_steps`), one counted run (icd: its ATen operators), then up to
    `repeats` timed runs (median and min)."""
    name = f"{method} b{batch}" + ("" if variant == "plain" else f" [{variant}]")
    row = {"method": method, "variant": variant, "batch": batch, "edit_rows": 2 * batch, "control": "p2p",
           "steps": steps if method != "icd" else pipe.icd_model.icd.boundaries.num_segments,
           "device": describe_device(device), "loadavg": [loadavg()]}
    if clock.expired():
        clock.log(f"{name}: skipped (--max-minutes)")
        return row | {"skipped": "--max-minutes reached before this row"}
    inputs = edit_inputs(image_size, batch)
    runs: list[dict] = []
    reset_peak(device)  # once per row, before the warm-ups: never between timed runs
    try:
        graphs0, breaks0, upcasts0 = compiled_graphs(), graph_breaks(), pipe.model.vae_upcasts
        row["warmup_s"] = []
        for k in range(warmups):
            if watch is not None:
                watch.label = f"{name} warm-up {k + 1}"
            out = run_once(pipe, inputs, method, warmup_steps, device)
            row["warmup_s"].append(round(out["total_s"], 4))
            clock.log(f"{name}: warm-up {k + 1}/{warmups} ({warmup_steps or 'all'} steps) {out['total_s']:.2f} s")
        if method == "icd" and count_ops:
            counter = OpCounter()
            run_once(pipe, inputs, method, steps, device, counter)
            row["aten_ops"] = counter.ops
        if "compile" in variant:
            graphs1, breaks1 = compiled_graphs(), graph_breaks()
            row["graphs_compiled_in_warmup"] = graphs1 - graphs0
            row["graph_breaks_in_warmup"] = breaks1 - breaks0
        for k in range(repeats):
            if runs and clock.expired():
                clock.log(f"{name}: stopping after {len(runs)} timed runs (--max-minutes)")
                break
            if watch is not None:
                watch.label = f"{name} run {k + 1}"
                watch.reset()
            runs.append(run_once(pipe, inputs, method, steps, device))
            if method == "nti" and watch is not None:
                per_t = [watch.grad_per_t[t] for t in sorted(watch.grad_per_t, reverse=True)]
                row |= {"nti_inner_steps": sum(per_t), "nti_inner_cap": NTI_INNER * len(per_t),
                        "nti_inner_per_timestep": per_t}
            clock.log(f"{name}: run {k + 1}/{repeats} {runs[-1]['total_s']:.3f} s")
        if "compile" in variant:
            row["graphs_compiled_while_timed"] = compiled_graphs() - graphs1
            row["graph_breaks_while_timed"] = graph_breaks() - breaks1
        row["vae_upcasts"] = pipe.model.vae_upcasts - upcasts0  # VAE batches re-run in fp32 (fp16 overflow)
    except Exception as e:  # a row that fails is reported, the others still run
        row |= {"error": describe_error(e), "peak_gib_at_error": peak_gib(device)}
        clock.log(f"{name}: {row['error']}")
    row["loadavg"].append(loadavg())
    if runs:
        row = summarise(row, runs)
        row |= {"per_image_s": row["total_s"] / batch, "runs": len(runs), "nfe_invert": runs[-1]["nfe_invert"],
                "nfe_edit": runs[-1]["nfe_edit"], "peak_gib": peak_gib(device), "_images": runs[-1]["images"]}
    return row


def with_floor(rows: list[dict], floor: dict) -> None:
    """Add `floor` after the icd row of its batch and variant, and that row's ratios to it (``floor_ratio``)."""
    edit = next((r for r in rows if r["method"] == "icd" and r["batch"] == floor["batch"]
                 and r["variant"] == floor["variant"]), None)
    if edit is not None and "total_s" in edit and "total_s" in floor:
        ops = edit.get("aten_ops"), floor.get("aten_ops")
        edit["floor_ratio"] = {"aten_ops": ops[0] / max(ops[1], 1) if None not in ops else None,
                               "median": edit["total_s"] / floor["total_s"],
                               "min": edit["total_min_s"] / floor["total_min_s"],
                               "cpu_median": edit["cpu_s"] / floor["cpu_s"]}
    rows.append(floor)


def plan_rows(args, *, baselines: bool, warmups: int) -> list[tuple]:
    """(method, batch, steps, warm-ups, warm-up steps, repeats) of the rows in their order of importance: icd at each
    batch, then ddim / npi / nti (``--steps`` + ``--steps``, batch 1) unless skipped or not `baselines`."""
    plan = [("icd", b, None, warmups, None, args.repeats) for b in icd_batches(args)]
    warm = min(args.warmup_steps, args.steps)
    bw = warmups if args.baseline_warmups is None else args.baseline_warmups
    for method in ("ddim", "npi", "nti") if baselines else ():
        if method not in args.skip:
            plan.append((method, 1, args.steps, bw, warm, 1 if method == "nti" else args.baseline_repeats))
    return plan


def run_rows(pipe: Pipeline, plan: list[tuple], args, device: torch.device, clock: Clock, rows: list[dict], save, *,
             variant: str = "plain", floor_call=None) -> None:
    """Append the rows of `plan` in `variant` (each icd row followed by its floor in the same mode; a variant row
    with its speed-up over the plain row of the same method and batch and the largest pixel difference of their
    edits), `save` after each."""
    watch = CallWatch(pipe.base().unet, clock, args.progress_every)
    for method, batch, steps, warmups, wsteps, repeats in plan:
        name = f"{method} b{batch}" + ("" if variant == "plain" else f" [{variant}]")
        save(running=name)
        # no operator count on a compiled row: under a dispatch mode dynamo runs the UNet eagerly, for good
        count_ops = not args.no_op_count and "compile" not in variant
        row = edit_row(pipe, device, clock, watch, method=method, batch=batch, steps=steps, warmups=warmups,
                       warmup_steps=wsteps, repeats=repeats, variant=variant, image_size=args.image_size,
                       count_ops=count_ops)
        plain = next((r for r in rows if r["variant"] == "plain" and r["method"] == method and r["batch"] == batch),
                     {})
        if variant != "plain" and "total_s" in row and "total_s" in plain:
            row["speedup_vs_plain"] = plain["total_s"] / row["total_s"]
            diff = np.abs(row["_images"].astype(int) - plain["_images"].astype(int))
            row["max_pixel_diff_vs_plain"] = int(diff.max())  # uint8 levels (0-2: the same computation)
        rows.append(row)
        if method == "icd":  # its floor in the same run and mode, right after it
            save(running=f"floor b{batch}" + ("" if variant == "plain" else f" [{variant}]"))
            floor = floors(pipe, args, device, batch)
            floor.call = floor_call or floor.unet
            with_floor(rows, floor_row(floor, device, clock, batch=batch, warmups=warmups, repeats=args.repeats,
                                       variant=variant, count_ops=count_ops))
        save()
    watch.handle.remove()


_FLOORS: dict[int, Floor] = {}


def floors(pipe: Pipeline, args, device: torch.device, batch: int) -> Floor:
    """The floor of `batch` (one plain UNet shared by every batch; ``--cpu-user``: the original UNet, the same
    architecture without the guidance projection, so that memory holds one UNet less)."""
    if batch not in _FLOORS:
        unet = next(iter(_FLOORS.values())).unet if _FLOORS else pipe.base().unet if args.cpu_user else None
        _FLOORS[batch] = Floor(pipe, batch, args.image_size, device, unet=unet)
    return _FLOORS[batch]


def icd_batches(args) -> list[int]:
    return [1] if "b8" in args.skip else [1, 8]


def variant_rows(pipe: Pipeline, variant: str, args, device: torch.device, clock: Clock, rows: list[dict],
                 save, *, part: str = "icd") -> None:
    """Put the UNets in `variant` (channels-last in place; compiled through the library's path) and append the rows
    of `part`: ``icd`` at each batch (compiled: ``--compile-batches``) with its floor, or ``baselines`` (the ddim /
    npi / nti rows on the compiled original UNet, ``--compile-baselines``)."""
    compiled = "compile" in variant
    warmups = args.compile_warmups if compiled else args.warmups
    plan = [r for r in plan_rows(args, baselines=part == "baselines", warmups=warmups)
            if (r[0] == "icd") == (part == "icd")]
    if compiled:  # each static batch shape compiles its own graphs
        plan = [r for r in plan if r[0] != "icd" or r[1] in args.compile_batches]
    if clock.expired():
        rows += [{"method": m, "variant": variant, "batch": b, "skipped": "--max-minutes reached before this row"}
                 for m, b, *_ in plan]
        save()
        return
    model = pipe.icd_model
    floor_unet = floors(pipe, args, device, plan[0][1]).unet if plan and part == "icd" else None
    floor_call = None
    if "channels_last" in variant and part == "icd":
        set_memory_format(model, torch.channels_last)
        if floor_unet is not None:
            floor_unet.to(memory_format=torch.channels_last)
    if compiled:
        floor_call = compile_models(pipe, floor_unet, mode=args.compile, backend=args.compile_backend,
                                    part=part)
    run_rows(pipe, plan, args, device, clock, rows, save, variant=variant, floor_call=floor_call)


def paired_row(pipe: Pipeline, variant: str, pairs: int, device: torch.device, clock: Clock, image_size: int) -> dict:
    """icd b1 eager and compiled in alternation, `pairs` times (each pair under the same load: a shared machine's
    load moves the two alike), after the compiled rows built the graphs: the medians of each and of the per-pair
    ratios, wall and CPU seconds."""
    model, inputs = pipe.icd_model, edit_inputs(image_size, 1)
    compiled, out = model.compiled, {"eager": [], "compiled": []}
    row = {"method": "icd", "variant": f"paired eager / {variant}", "batch": 1, "pairs": pairs, "loadavg": [loadavg()]}
    graphs0 = compiled_graphs()
    try:
        for k in range(pairs):
            if k and clock.expired():
                break
            for name in ("eager", "compiled"):
                model.compiled = compiled if name == "compiled" else None
                r = run_once(pipe, inputs, "icd", None, device)
                out[name].append((r["total_s"], r["cpu_s"]))
    finally:
        model.compiled = compiled
    row["loadavg"].append(loadavg())
    for name, runs in out.items():
        row[f"{name}_s"] = statistics.median(t for t, _ in runs)
        row[f"{name}_cpu_s"] = statistics.median(c for _, c in runs)
    row["speedup_median_of_pairs"] = statistics.median(e[0] / c[0] for e, c in zip(out["eager"], out["compiled"]))
    row["cpu_speedup_median_of_pairs"] = statistics.median(e[1] / c[1] for e, c in zip(out["eager"], out["compiled"]))
    row["graphs_compiled_while_timed"] = compiled_graphs() - graphs0
    clock.log(f"paired: eager {row['eager_s']:.4f} s, compiled {row['compiled_s']:.4f} s, "
              f"x{row['speedup_median_of_pairs']:.3f} (CPU x{row['cpu_speedup_median_of_pairs']:.3f})")
    return row


def ratios(rows: list[dict], steps: int) -> dict:
    """Seconds (total_s, batch 1, plain rows) of one method over another's: a / b."""
    t = {r["method"]: r.get("total_s") for r in rows if r["variant"] == "plain" and r["batch"] == 1}
    t.pop("floor", None)
    names = {"icd": "icd", "ddim": f"ddim{steps}", "npi": f"npi{steps}", "nti": "nti"}
    pairs = [("icd", "ddim"), ("icd", "npi"), ("nti", "icd"), ("ddim", "icd"), ("npi", "icd")]
    return {f"{names[a]}/{names[b]}": (t[a] / t[b] if t.get(a) and t.get(b) else None) for a, b in pairs}


# ---------------------------------------------------------------------------------------------------- training
def train_timings(tokenizer_dir: Path, device: torch.device, clock: Clock, *, scale: int, image_size: int,
                  batch: int, settings: list[tuple[str, bool]], steps: int) -> list[dict]:
    """Seconds per `training_step` (fp32 master weights, rank-64 adapters) for each (precision, checkpointing)."""
    _, model = sd15.random_models(tokenizer_dir, vocabulary=world.vocabulary(), device=device,
                                  dtype=torch.float32, scale=scale, image_size=image_size, rank=None)
    lora.add_adapters(model.unet, rank=64, alpha=64)
    model.unet.to(device)
    group = ProcessGroup(str(device))
    latent = image_size // 8
    z_all = torch.randn(batch, 4, latent, latent, device=device)
    tokens = torch.randn(batch, sd15.MAX_LENGTH, model.unet.config.cross_attention_dim, device=device)
    rows = []
    for mode, checkpointing in settings:
        row = {"mixed_precision": mode, "gradient_checkpointing": checkpointing, "batch": batch}
        if clock.expired():
            rows.append(row | {"skipped": "--max-minutes reached before this row"})
            continue
        try:
            cfg = ICDConfig(batch_size=batch, mixed_precision=mode, gradient_checkpointing=checkpointing, rank=64,
                            alpha=64, device=str(device))
            boundaries = cfg.resolved_boundaries()
            if checkpointing:
                model.unet.enable_gradient_checkpointing()
                model.unet.train()
            else:
                model.unet.disable_gradient_checkpointing()
                model.unet.eval()
            params, opts = adapter_optimizers(model, cfg)
            precision = Precision(mode, device)
            reset_peak(device)
            times, losses = [], {}
            for step in range(2 + steps):
                d = batch_draws(cfg, step, n_data=batch, shape=tuple(z_all.shape[1:]),
                                num_segments=boundaries.num_segments)
                d = {k: v.to(device) for k, v in d.items()}
                sync(device)
                t0 = time.perf_counter()
                losses = training_step(model, cfg, Batch(z_all[d["idx"]], Cond(tokens=tokens[d["idx"]]), d, boundaries),
                                       params=params, opts=opts, sync=group, precision=precision)
                sync(device)
                if step >= 2:
                    times.append(time.perf_counter() - t0)
            row |= {"step_s": sum(times) / len(times), "peak_gib": peak_gib(device),
                    "losses": {k: float(v) for k, v in losses.items()}}
        except Exception as e:
            row["error"] = describe_error(e)
        clock.log(f"train {mode} checkpointing={checkpointing}: {row.get('step_s', row.get('error'))}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", choices=sorted(FAMILIES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                    help="inference dtype of the editing rows (default fp16 on CUDA, fp32 on a CPU)")
    ap.add_argument("--scale", type=int, default=1, help="sd15: divide every width by this (1 = SD 1.5)")
    ap.add_argument("--tiny", action="store_true", help="sdxl: the same topology at width 32 (CPU smoke)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the family's native size (512 / 1024)")
    ap.add_argument("--build", default="memory", choices=["memory", "disk"], help="see the module docstring")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs per icd / floor row (after --warmups; default 5, --cpu-user 3)")
    ap.add_argument("--warmups", type=int, default=1, help="untimed runs before each row (0: a CPU test)")
    ap.add_argument("--steps", type=int, default=50, help="DDIM / NPI / NTI steps (inversion and edit each)")
    ap.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of ddim / npi (nti: always 1)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps of the baselines' untimed warm-up run")
    ap.add_argument("--channels-last", action="store_true", help="add icd rows with the UNet in channels-last")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="add icd rows with torch.compile(unet, mode=MODE): default, max-autotune-no-cudagraphs, ...")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a CPU smoke test)")
    ap.add_argument("--compile-warmups", type=int, default=2, help="untimed runs of a compiled row (compilation)")
    ap.add_argument("--compile-batches", default="1", help="comma list: the icd batches of the compiled rows (each "
                    "batch size compiles its own static-shape graphs)")
    ap.add_argument("--compile-pairs", type=int, default=0, metavar="N",
                    help="after the compiled rows, N alternating eager / compiled icd b1 runs (paired: the same load)")
    ap.add_argument("--compile-baselines", action="store_true",
                    help="compiled rows of ddim / npi / nti too (the original UNet compiled: more graphs to build)")
    ap.add_argument("--baseline-warmups", type=int, default=None,
                    help="untimed --warmup-steps runs before a baseline row (default: --warmups)")
    ap.add_argument("--no-op-count", action="store_true",
                    help="no ATen-operator counting run (it is one more untimed run per icd / floor row)")
    ap.add_argument("--cpu-user", action="store_true",
                    help="what a CPU-only user waits: SD 1.5 at 512x512 (or --image-size) on this CPU, iCD 4+4 P2P "
                    "and its floor, DDIM --steps+--steps P2P once; seconds and peak resident memory (sets --device "
                    "cpu --family sd15 --skip b8,npi,nti,train --no-op-count --warmup-steps 1; --repeats default 3)")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps per setting (after 2 warm-ups)")
    ap.add_argument("--skip", default="", help=f"comma list of parts to skip: {', '.join(PARTS)}")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no row or run after this many minutes")
    ap.add_argument("--progress-every", type=int, default=100, help="a progress line every N baseline UNet calls")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.cpu_user:
        args.device, args.family, args.no_op_count, args.warmup_steps = "cpu", "sd15", True, 1
        args.skip = ",".join(sorted(set(args.skip.split(",")) - {""} | {"b8", "npi", "nti", "train"}))
        args.repeats = 3 if args.repeats is None else args.repeats
    args.repeats = 5 if args.repeats is None else args.repeats
    args.skip = [s for s in args.skip.split(",") if s]
    args.compile_batches = [int(b) for b in args.compile_batches.split(",") if b]
    unknown = set(args.skip) - set(PARTS)
    if unknown:
        ap.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if args.family == "sdxl" and args.scale != 1 or args.family == "sd15" and args.tiny:
        ap.error("--scale is for sd15, --tiny for sdxl")
    args.image_size = args.image_size or FAMILIES[args.family].NATIVE_SIZE
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    clock = Clock(args.family, args.max_minutes)
    out = Path(args.out)
    report = {"family": args.family, "device": describe_device(device), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "image_size": args.image_size, "inference_dtype": str(dtype)[6:],
              "scale": args.scale, "tiny": args.tiny, "build": args.build, "weights": "random",
              "max_minutes": args.max_minutes, "threads": torch.get_num_threads(), "cpu_user": args.cpu_user,
              "compile": args.compile, "loadavg_start": loadavg()}

    def save(running: str | None = None) -> None:
        report["running"] = running  # set while a row runs: a run killed from outside shows which
        if "edit" in report:
            report["ratios"] = ratios(report["edit"], args.steps)
        clean = {k: ([{f: v for f, v in r.items() if not f.startswith("_")} for r in val]
                     if k == "edit" else val) for k, val in report.items()}
        write_text_atomic(out, json.dumps(clean, indent=1) + "\n")

    def build(tmp: Path) -> Pipeline:
        """The models, with their sizes in the report."""
        clock.log(f"building {args.family} at {args.image_size}px, {report['inference_dtype']}, {args.build}")
        save(running="build")
        t0 = time.perf_counter()
        pipe = build_pipeline(args, tmp, device, dtype)
        sync(device)
        report["build_s"] = time.perf_counter() - t0
        report["params_unet_m"] = sum(p.numel() for p in pipe.base().unet.parameters()) / 1e6
        report["params_text_m"] = sum(p.numel() for m in (pipe.model.text_encoder,
                                                          getattr(pipe.model, "text_encoder_2", None))
                                      if m is not None for p in m.parameters()) / 1e6
        clock.log(f"built in {report['build_s']:.1f} s (UNet {report['params_unet_m']:.0f} M parameters)")
        return pipe

    with tempfile.TemporaryDirectory() as tmp:
        if "edit" not in args.skip:
            pipe = build(Path(tmp))
            report["edit"] = rows = []
            plan = plan_rows(args, baselines=True, warmups=args.warmups)
            # the order of importance: icd (plain, channels-last, compiled: on top of channels-last when that ran),
            # then the baselines (plain, then on the compiled original UNet with --compile-baselines)
            run_rows(pipe, [r for r in plan if r[0] == "icd"], args, device, clock, rows, save)
            if args.channels_last:
                variant_rows(pipe, "channels_last", args, device, clock, rows, save)
            variant = ("compile+channels_last" if args.channels_last else "compile") + f":{args.compile}"
            if args.compile:
                variant_rows(pipe, variant, args, device, clock, rows, save)
                if args.compile_pairs and 1 in args.compile_batches and not clock.expired():
                    rows.append(paired_row(pipe, variant, args.compile_pairs, device, clock, args.image_size))
                    save()
            run_rows(pipe, [r for r in plan if r[0] != "icd"], args, device, clock, rows, save)
            if args.compile and args.compile_baselines:
                variant_rows(pipe, f"compile:{args.compile}", args, device, clock, rows, save, part="baselines")
            del pipe
            gc.collect()
            reset_peak(device)
        if "train" in args.skip:
            pass
        elif args.family != "sd15":
            report["train"] = "skipped: the training rows are SD-1.5-shaped only"
        else:  # alone on the device (its peak memory)
            save(running="train")
            settings = [("bf16", False), ("bf16", True), ("fp16", False), ("no", False)]
            report["train"] = train_timings(Path(tmp) / "tok", device, clock, scale=args.scale,
                                            image_size=args.image_size, batch=args.train_batch, settings=settings,
                                            steps=args.train_steps)
    save()
    for row in report.get("edit", []):
        print(json.dumps({k: v for k, v in row.items() if not k.startswith("_") and k != "nti_inner_per_timestep"}))
    print(f"ratios {json.dumps(report.get('ratios'))}")
    print(f"wrote {out}", flush=True)
    return json.loads(out.read_text())


if __name__ == "__main__":
    main()
