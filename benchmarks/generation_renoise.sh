#!/usr/bin/env bash
# docs/RESULTS.md §2.13: 4-step generation with the paper's deterministic jumps and with re-noised jumps
# (`--renoise 1`, multistep consistency sampling) beside the 50-step guidance-distilled teacher, w = 1 and 2,
# 500 + 500 held-out captions each (one thread; ≈ 25 min on the 2-core CPU).
#
# usage: bash benchmarks/generation_renoise.sh [OUT_DIR] [extra icd bench options, e.g. --adapters N=DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
OUT=${1:-out/bench/renoise}; shift || true
export HF_HUB_OFFLINE=1
T=(--n 500 --threads 1 --quiet --force)
for w in 1 2; do
  $ICD bench generation --methods icd,gddim50 --renoise 0 --guidance $w "${T[@]}" "$@" --out "$OUT/w$w"
  $ICD bench generation --methods icd --renoise 1 --guidance $w "${T[@]}" "$@" --out "$OUT/w$w-r1"
done
