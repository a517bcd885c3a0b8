#!/usr/bin/env bash
# Every measurement of one trained iCD row in docs/RESULTS.md §2.9-2.11, one thread: unguided and guided (w = 1,
# dynamic CFG τ 0.8) inversion on 200 held-out images, 4-step generation at w = 1 and 2 on 200 + 200 prompts, the
# forward/reverse hybrids of §2.4 (100 images) and editing (§3's protocol, 100 cases per kind, quality only); the
# first four are measure_icd_rows.sh without the teacher.
# Two rows measure side by side on two cores (`measure_icd_row.sh A ... & measure_icd_row.sh B ... & wait`).
#
# usage: bash benchmarks/measure_icd_row.sh ADAPTERS_DIR NAME OUT_DIR
#   e.g. bash benchmarks/measure_icd_row.sh runs/ablation/R64_f30/final F30 out/bench/lambda_f/R64_f30
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 ADAPTERS_DIR NAME OUT_DIR" >&2; exit 2; }
ICD=${ICD:-.venv/bin/icd}
PY=${PY:-.venv/bin/python}
DIR=$1; NAME=$2; OUT=$3
[ -f "$DIR/adapters.json" ] || { echo "error: $DIR has no adapters.json (not an iCD adapters folder)" >&2; exit 2; }
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
REF= bash benchmarks/measure_icd_rows.sh "$OUT" "icd:$NAME" --adapters "$NAME=$DIR"
$PY benchmarks/inversion_hybrids.py --n 100 --adapters "$DIR" | tail -4 > "$OUT/hybrids.txt"
$ICD bench editing --n 100 --methods "icd:$NAME" --adapters "$NAME=$DIR" --threads 1 --quiet --force --n-timing 1 \
  --out "$OUT/editing"
