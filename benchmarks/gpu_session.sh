#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool; never CI): time the Stable Diffusion paths (SD 1.5 at 512x512,
# SDXL at 1024x1024, random weights, fp16), then train the rows of configs/icd-gpu.toml side by side on the one GPU
# until a deadline, and leave in $OUT what comes back:
#   gpu_tests.log                           pytest -m gpu (tests/test_sd15.py on CUDA)
#   sd_timing_sd15.json / .log              benchmarks/sd_shaped_timing.py --family sd15 (editing rows, ratios,
#                                           channels-last / compiled rows, training steps as time allows)
#   sd_timing_sdxl.json / .log              benchmarks/sd_shaped_timing.py --family sdxl (editing rows, ratios)
#   adapters-N.tar                          final (or latest-checkpoint) adapters of two rows each, + their log.csv
#   logs.tar                                every row's stdout/stderr and nvidia-smi
# Issue 36's timing session (no training, under 8 minutes): `bash benchmarks/gpu_session.sh timing` -- see the
# block starting at `timing` below for what it runs, how to carry what it needs, and its CPU smoke test.
# Usage (on the device machine, after installing diffusers there; see docs/experiments/gpu-mixed-precision.md for the exact call):
#   OUT=/some/dir BUDGET=540 bash benchmarks/gpu_session.sh [ROW ...]
#   OUT=/some/dir GPU_TESTS=0 TRAIN=0 bash benchmarks/gpu_session.sh       # the SD timings only (issue 21, item 5)
#   OUT=/some/dir GPU_TESTS=0 TRAIN=0 SD15_TIMING_S=0 SDXL_TIMING_S=0 THROUGHPUT=1 THROUGHPUT_S=480 \
#       bash benchmarks/gpu_session.sh                                    # training throughput only (issue 22, item 5)
#   train_throughput_sd15.json / .log       benchmarks/train_throughput.py (both stages, checkpointing off / on)
# BUDGET: seconds from the start of this script by which every training is stopped (rows that have not finished
# return their latest checkpoint, named in exported.txt with its step); no timing runs past it either.
# Time guards of the timings: each family runs under `timeout SD15_TIMING_S` / `timeout SDXL_TIMING_S` (default
# 225 + 285 s with TRAIN=0; 180 + 0, i.e. no SDXL, in a training session; each cut to what BUDGET leaves, a family
# with under 90 s is skipped) and is passed --max-minutes = (its timeout - 60 s) / 60, so it starts no row in its
# last minute; the JSON is rewritten after every row, so a family cut by its timeout still returns the
# rows it finished (its "running" field names the row that was cut). TRAIN=0: no latents prefill, training or export.
# Measured on an H100 (2026-11-26) with the earlier SD-1.5-only timing: ~140 s; eight rows side by side train at
# ~1.2 steps/s each (~10 steps/s in all: each process is bound by Python and kernel launches, not by the GPU), so a
# 1 400-step row needs ~20 min that way -- a 15-minute device budget fits two or three rows, not eight. A CPU dry run:
#   OUT=/tmp/gs BUDGET=300 DEVICE=cpu TRAIN_SET="--set steps=4 --set checkpoint_every=2 --set n_images=256" \
#     SD15_TIMING_ARGS="--device cpu --scale 10 --image-size 64 --repeats 1 --steps 2 --warmups 0 --train-batch 2 \
#     --train-steps 1" SDXL_TIMING_ARGS="--device cpu --tiny --image-size 64 --repeats 1 --steps 2 --warmups 0" \
#     bash benchmarks/gpu_session.sh Q32 SEQ
set -u
OUT=${OUT:?set OUT to a folder}
BUDGET=${BUDGET:-540}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
TRAIN_SET=${TRAIN_SET:-}
GPU_TESTS=${GPU_TESTS:-1}
TRAIN=${TRAIN:-1}
SD15_TIMING_ARGS=${SD15_TIMING_ARGS:---device cuda --repeats 2 --channels-last --compile default --train-batch 8 --train-steps 3}
SDXL_TIMING_ARGS=${SDXL_TIMING_ARGS:---device cuda --repeats 2 --channels-last --skip train}
if [ "$TRAIN" = 1 ]; then timing_s=(180 0); else timing_s=(225 285); fi  # training sessions keep their time
SD15_TIMING_S=${SD15_TIMING_S:-${timing_s[0]}}
SDXL_TIMING_S=${SDXL_TIMING_S:-${timing_s[1]}}
N_IMAGES=60000
[[ "$TRAIN_SET" =~ n_images=([0-9]+) ]] && N_IMAGES=${BASH_REMATCH[1]}
CONFIG=configs/icd-gpu.toml
start=$(date +%s)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
check_imports() {  # LABEL: exit 3 naming every package the timing blocks cannot import (the carried wheels)
    local missing
    if ! missing=$($PY - 2>&1 <<'PYEOF'
import importlib
bad = []
for name in ("torch", "numpy", "PIL", "diffusers", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
             "huggingface_hub", "icd.pipeline"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 -- report every missing piece at once
        bad.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
print("; ".join(bad))
raise SystemExit(1 if bad else 0)
PYEOF
    ); then
        echo "gpu_session $1: cannot import: $missing (install the carried wheels: see this script's header)"
        exit 3
    fi
}
# ---------------------------------------------------------------------------------------------------------------
# `timing`: issue 36's GPU session -- SD 1.5 at 512x512 and SDXL at 1024x1024 with random weights (fp16), eager and
# compiled (the library's --compile path: reduce-overhead / CUDA graphs), iCD 4+4 P2P with its floor row in both
# modes, DDIM 50+50, NPI 50+50 and null-text inversion with P2P (SD 1.5: also on the compiled original UNet), in
# under 8 minutes (TIMING_BUDGET, default 470 s). Nothing trains, no GPU tests.
#   OUT=/some/dir bash benchmarks/gpu_session.sh timing           # on the device machine (see below)
#   OUT=/tmp/gs PY=.venv/bin/python bash benchmarks/gpu_session.sh timing --smoke   # the same rows on a CPU, tiny
# Leaves in $OUT: timing_sd15.json / .log, timing_sdxl.json / .log (benchmarks/sd_shaped_timing.py's report, one row
# per method x mode, rewritten after every row: a family cut by its timeout keeps the rows it finished) and
# summary.md (one line per row: seconds median / min, floor ratio, graphs compiled and graph breaks while timed,
# peak memory, VAE fp32 re-runs).
# What it needs there: a CUDA torch (the machine has one) and this repository's other dependencies, carried as
# wheels in an ignored folder (untracked, never committed) and installed beside torch:
#   here:  .venv/bin/pip download --no-deps -d out/whl diffusers==0.42.1 transformers==5.25.0 peft==0.21.2 \
#              accelerate==1.16.0 tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0
#   device tool: run(command="pip install -q --no-deps --target /tmp/site out/whl/*.whl && PYTHONPATH=/tmp/site
#              OUT=$OUT bash benchmarks/gpu_session.sh timing", carry=["out/whl"], timeout_s=600)
# The script first checks that every import it needs works (one line naming what is missing, exit 3, seconds spent).
# Time guards: SD 1.5 under `timeout TIMING_SD15_S` (default 200 s), SDXL under TIMING_SDXL_S (250 s), each cut to
# what TIMING_BUDGET leaves and passed --max-minutes = (timeout - 45 s) / 60, so no row starts in its last 45 s;
# rows run in their order of importance (icd eager + floor, icd compiled + floor, ddim, npi, nti eager, then SD
# 1.5's compiled baselines). The seconds above are estimates (compile time of a full-size UNet on the host CPU, ~0.5
# s per SD 1.5 edit eager, RESULTS §6): this mode was smoke-tested on a CPU only (`--smoke`: SD 1.5 at 1/20 width
# and tiny SDXL at 64x64, 2+2 baseline steps, dynamo with the eager backend), never on a GPU.
if [ "${1:-}" = timing ]; then
    smoke=0
    [ "${2:-}" = --smoke ] && smoke=1
    budget=${TIMING_BUDGET:-470}
    export TORCHINDUCTOR_FX_GRAPH_CACHE=${TORCHINDUCTOR_FX_GRAPH_CACHE:-1}
    if [ "$smoke" = 1 ]; then
        common="--device cpu --image-size 64 --repeats 1 --warmups 0 --steps 2 --warmup-steps 1 --compile default \
--compile-backend eager --compile-warmups 1 --skip b8,train"
        SD15_ARGS=${SD15_ARGS:-"$common --scale 20 --compile-baselines"}
        SDXL_ARGS=${SDXL_ARGS:-"$common --tiny"}
    else
        common="--device cuda --repeats 5 --warmups 1 --steps 50 --warmup-steps 2 --compile auto --compile-warmups 2 \
--skip b8,train"
        SD15_ARGS=${SD15_ARGS:-"$common --compile-baselines"}
        SDXL_ARGS=${SDXL_ARGS:-"$common"}
    fi
        mkdir -p "$OUT"
    command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    check_imports timing
    family_timing() {  # FAMILY SECONDS ARGS
        local family=$1 limit=$2 args=$3 left
        left=$(( start + budget - $(date +%s) ))
        [ "$left" -lt "$limit" ] && limit=$left
        if [ "$limit" -lt 60 ]; then
            echo "timing $family skipped (limit $limit s)"
            return
        fi
        # shellcheck disable=SC2086
        timeout "$limit" $PY benchmarks/sd_shaped_timing.py --family "$family" $args \
            --max-minutes "$(awk -v s="$limit" 'BEGIN { print (s - 45) / 60 }')" --out "$OUT/timing_$family.json" \
            > "$OUT/timing_$family.log" 2>&1
        echo "timing $family rc=$? (limit $limit s) after $(( $(date +%s) - start )) s"
    }
    family_timing sd15 "${TIMING_SD15_S:-200}" "$SD15_ARGS"
    family_timing sdxl "${TIMING_SDXL_S:-250}" "$SDXL_ARGS"
    $PY - "$OUT" > "$OUT/summary.md" 2>&1 <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| family | method | mode | batch | s median | s min | floor ratio (median) | graphs / breaks while timed | "
      "peak GiB | VAE fp32 re-runs |")
print("|---|---|---|---|---|---|---|---|---|---|")
for family in ("sd15", "sdxl"):
    path = out / f"timing_{family}.json"
    if not path.is_file():
        print(f"| {family} | (no report) | | | | | | | | |")
        continue
    report = json.loads(path.read_text())
    for r in report.get("edit", []):
        def f(key, fmt="{:.4f}"):
            v = r.get(key)
            return "" if v is None else fmt.format(v)
        ratio = (r.get("floor_ratio") or {}).get("median")
        graphs = "" if "graphs_compiled_while_timed" not in r else \
            f"{r['graphs_compiled_while_timed']} / {r.get('graph_breaks_while_timed', '')}"
        note = r.get("error") or r.get("skipped") or ""
        print(f"| {family} | {r['method']} | {r['variant']} | {r['batch']} | {f('total_s')} | {f('total_min_s')} | "
              f"{'' if ratio is None else f'{ratio:.3f}'} | {graphs} | {f('peak_gib', '{:.2f}')} | "
              f"{r.get('vae_upcasts', '')} {note} |")
    if report.get("running"):
        print(f"| {family} | cut while running: {report['running']} | | | | | | | | |")
PYEOF
    cat "$OUT/summary.md"
    echo "timing session done after $(( $(date +%s) - start )) s"
    exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
# `flow`: issue 40's flow timing session -- benchmarks/flow_timing.py on a FLUX.1-dev-shaped and an SD3.5-medium-
# shaped pipeline at their real architectures with random weights (bf16, 1024x1024, 1 source + 1 target; text
# encoders small with the real token shapes): flow-ode 28+28 (prompt swap), iCD 4+4 (random fused rank-64 adapters;
# on SD3 a cost proxy, no guidance input there), FlowEdit (defaults), RF-Inversion 28+28, 2 timed runs each after one
# warm-up, in under 7.5 minutes (FLOW_BUDGET, default 450 s, one process for both families). Nothing trains.
#   OUT=/some/dir bash benchmarks/gpu_session.sh flow                                   # on the device machine
#   OUT=/tmp/gs PY=.venv/bin/python bash benchmarks/gpu_session.sh flow --smoke         # the same rows on a CPU, tiny
# Leaves in $OUT: flow_timing.json (every row: seconds median / min, NFE, rows per call, peak GiB, ratio to the
# family's flow-ode 28+28; rewritten after every row and timed run, so a run cut by its timeout keeps what it
# finished, "running" naming the cut step), flow_timing.log (progress, one summary line per row) and
# flow_summary.md (one line per row). Needs the same carried wheels as `timing` (see that block):
#   device tool: run(command="pip install -q --no-deps --target /tmp/site out/whl/*.whl && PYTHONPATH=/tmp/site
#              OUT=$OUT bash benchmarks/gpu_session.sh flow", carry=["out/whl"], timeout_s=600)
# Time guards: the script runs under `timeout` of what FLOW_BUDGET leaves, with --max-minutes 40 s short of it and
# --family-minutes flux=FLOW_FLUX_MIN (4.5),sd3=FLOW_SD3_MIN (2): no row or timed run starts past them. Estimate
# (not measured: CPU-smoke-tested only): FLUX build + warm-ups ~1 min + ~60 s per repeat of the four rows (~0.27 s
# per transformer call at batch 1, ~0.5 s at batch 2), SD3 ~0.5 min + ~25 s per repeat: ~4.5 min with 2 repeats,
# ~5.5 min with the wheel install and imports.
if [ "${1:-}" = flow ]; then
    smoke=0
    [ "${2:-}" = --smoke ] && smoke=1
    budget=${FLOW_BUDGET:-450}
    if [ "$smoke" = 1 ]; then
        FLOW_ARGS=${FLOW_ARGS:-"--device cpu --scale 24 --image-size 64 --repeats 1 --warmups 0"}
    else
        FLOW_ARGS=${FLOW_ARGS:-"--device cuda --dtype bf16 --image-size 1024 --repeats 2 --warmups 1 --warmup-steps 2"}
    fi
    mkdir -p "$OUT"
    command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    check_imports flow
    limit=$(( start + budget - $(date +%s) ))
    if [ "$limit" -lt 60 ]; then
        echo "flow timing skipped (limit $limit s)"
        exit 0
    fi
    # shellcheck disable=SC2086
    timeout "$limit" $PY benchmarks/flow_timing.py --family flux,sd3 $FLOW_ARGS \
        --max-minutes "$(awk -v s="$limit" 'BEGIN { print (s - 40) / 60 }')" \
        --family-minutes "flux=${FLOW_FLUX_MIN:-4.5},sd3=${FLOW_SD3_MIN:-2}" --out "$OUT/flow_timing.json" \
        > "$OUT/flow_timing.log" 2>&1
    echo "flow timing rc=$? (limit $limit s) after $(( $(date +%s) - start )) s"
    $PY - "$OUT" > "$OUT/flow_summary.md" 2>&1 <<'PYEOF'
import json, sys
from pathlib import Path

path = Path(sys.argv[1]) / "flow_timing.json"
if not path.is_file():
    print("(no report: see flow_timing.log)")
    raise SystemExit(0)
report = json.loads(path.read_text())
print(f"{report['device']}, {report['dtype']}, {report['image_size']}px, {report['batch']}, scale {report['scale']}")
print("| family | method | steps | s median | s min | runs | NFE | rows per call | peak GiB | x flow-ode (median / min) "
      "| note |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for family, entry in report["families"].items():
    if entry.get("error") or entry.get("skipped"):
        print(f"| {family} | (build) | | | | | | | | | {entry.get('error') or entry.get('skipped')} |")
    for r in entry.get("rows", []):
        ratio = r.get("ratio_to_flow_ode") or {}
        f = lambda v, fmt="{:.3f}": "" if v is None else fmt.format(v)  # noqa: E731
        nfe = f"{r['nfe_invert']}+{r['nfe_edit']}={r['nfe']}" if "nfe" in r else ""
        note = r.get("error") or r.get("skipped") or ("cost proxy (no guidance input)" if r.get("proxy") else "")
        print(f"| {family} | {r['method']} | {r['steps']} | {f(r.get('total_s'))} | {f(r.get('total_min_s'))} | "
              f"{r.get('runs', '')} | {nfe} | {r.get('rows_per_call', '')} | {f(r.get('peak_gib'), '{:.2f}')} | "
              f"{f(ratio.get('total_s'))} / {f(ratio.get('total_min_s'))} | {note} |")
if report.get("running"):
    print(f"cut while running: {report['running']}")
PYEOF
    cat "$OUT/flow_summary.md"
    echo "flow session done after $(( $(date +%s) - start )) s"
    exit 0
fi

rows=("$@")
if [ ${#rows[@]} -eq 0 ]; then
    mapfile -t rows < <(sed -n 's/^\[\([A-Za-z0-9_]*\)\].*/\1/p' "$CONFIG")
fi
mkdir -p "$OUT/logs" runs/gpu/cache
nvidia-smi > "$OUT/logs/nvidia-smi.txt" 2>&1

# 1. the training latents (CPU threads, while the GPU times the SD-shaped path)
prefill=
if [ "$TRAIN" = 1 ]; then
N_IMAGES=$N_IMAGES $PY - > "$OUT/logs/prefill.log" 2>&1 <<'EOF' &
import os
import torch
torch.set_num_threads(8)
from icd.models.loading import load_model, resolve_model_path
from icd.train.data import world_latents
m = load_model("embedded")
z, _ = world_latents(m.vae, resolve_model_path("embedded") / "vae", int(os.environ["N_IMAGES"]), max_objects=2, cache_dir="runs/gpu/cache")
print("latents", tuple(z.shape))
EOF
prefill=$!
fi

# 2. the GPU tests (pytest -m gpu: every editing method on CUDA in fp16), then the SD timings, alone on the GPU
if [ "$GPU_TESTS" = 1 ]; then
    timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_sd15.py > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests rc=$? after $(( $(date +%s) - start )) s"
fi
sd_timing() {  # FAMILY SECONDS ARGS: one family under its timeout, cut to what BUDGET leaves
    local family=$1 limit=$2 args=$3 left
    left=$(( start + BUDGET - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 90 ]; then
        echo "sd timing $family skipped (limit $limit s)"
        return
    fi
    # shellcheck disable=SC2086
    timeout "$limit" $PY benchmarks/sd_shaped_timing.py --family "$family" $args \
        --max-minutes "$(awk -v s="$limit" 'BEGIN { print (s - 60) / 60 }')" --out "$OUT/sd_timing_$family.json" \
        > "$OUT/sd_timing_$family.log" 2>&1
    echo "sd timing $family rc=$? (limit $limit s) after $(( $(date +%s) - start )) s"
}
sd_timing sd15 "$SD15_TIMING_S" "$SD15_TIMING_ARGS"
sd_timing sdxl "$SDXL_TIMING_S" "$SDXL_TIMING_ARGS"
# training throughput of both stages at full size (issue 22, item 5): THROUGHPUT=1, under THROUGHPUT_S seconds
if [ "${THROUGHPUT:-0}" = 1 ]; then
    limit=${THROUGHPUT_S:-300}
    left=$(( start + BUDGET - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    # shellcheck disable=SC2086
    timeout "$limit" $PY benchmarks/train_throughput.py --family sd15 --device "$DEVICE" ${THROUGHPUT_ARGS:-} \
        --out "$OUT/train_throughput_sd15.json" > "$OUT/train_throughput_sd15.log" 2>&1
    echo "train throughput rc=$? (limit $limit s) after $(( $(date +%s) - start )) s"
fi
if [ "$TRAIN" != 1 ]; then
    tar -cf "$OUT/logs.tar" -C "$OUT" logs && rm -r "$OUT/logs"
    echo "session done (TRAIN=0) after $(( $(date +%s) - start )) s"
    exit 0
fi
wait $prefill
echo "prefill rc=$? after $(( $(date +%s) - start )) s"

# 3. the rows, side by side, until the deadline
left=$(( start + BUDGET - 100 - $(date +%s) ))  # ~100 s kept for the exports and the tars
if [ "$left" -lt 30 ]; then
    echo "no time left of BUDGET for training ($left s)"
    rows=()
fi
echo "training ${rows[*]} for at most $left s"
pids=()
for row in "${rows[@]}"; do
    # shellcheck disable=SC2086
    timeout "$left" $PY -m icd.cli train icd --config "$CONFIG" --section "$row" --set "device=$DEVICE" $TRAIN_SET \
        > "$OUT/logs/$row.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
echo "training done after $(( $(date +%s) - start )) s"

# 4. export, all rows at once (each export loads the model: ~15 s): final/ or the latest checkpoint's adapters;
# two rows per tar (each under 16 MB at rank 16)
: > "$OUT/exported.txt"
mkdir -p runs/gpu/export
export_row() {
    local row=$1 dir=runs/gpu/$1
    if [ -f "$dir/final/adapters.json" ]; then
        cp -r "$dir/final" "runs/gpu/export/$row" && echo "$row final" >> "$OUT/exported.txt"
    elif [ -f "$dir/latest" ]; then
        $PY -c "import sys; from icd.train.icd import export_checkpoint; export_checkpoint(sys.argv[1], sys.argv[2])" \
            "$dir/$(cat "$dir/latest")" "runs/gpu/export/$row" > /dev/null 2>&1 \
            && echo "$row $(cat "$dir/latest")" >> "$OUT/exported.txt"
    else
        echo "$row none" >> "$OUT/exported.txt"
    fi
    cp "$dir/log.csv" "runs/gpu/export/$row/log.csv" 2>/dev/null
}
for row in "${rows[@]}"; do export_row "$row" & done
wait
i=0
for ((k = 0; k < ${#rows[@]}; k += 2)); do
    pair=()
    for row in "${rows[@]:k:2}"; do [ -d "runs/gpu/export/$row" ] && pair+=("$row"); done
    [ ${#pair[@]} -gt 0 ] && tar -cf "$OUT/adapters-$i.tar" -C runs/gpu/export "${pair[@]}" && i=$((i + 1))
done
tar -cf "$OUT/logs.tar" -C "$OUT" logs && rm -r "$OUT/logs"
cat "$OUT/exported.txt"
echo "session done after $(( $(date +%s) - start )) s"
