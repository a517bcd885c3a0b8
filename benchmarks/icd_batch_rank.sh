#!/usr/bin/env bash
# Issue 3's last two CPU levers (docs/RESULTS.md §2.8), rows of configs/icd-ablation.toml:
#   LB128_ft     - G_cos_r05 fine-tuned at 4x its batch (128), cosine 2e-5 -> 0 over 400 steps (~7 s/step, 47 min)
#   R64_cos_r05  - G_cos_r05's recipe at the paper's LoRA rank 64 (alpha 32), 1 400 steps (~2.3 s/step, 54 min)
# Each trains as one two-thread process (they resume from their last checkpoint when started again), then both are
# measured as §2.4-2.5 (one thread) without re-measuring the teacher (§2.4's row, same harness and images).
# Needs runs/guidance/final (`icd train guidance --config configs/embedded.toml`) and runs/ablation/G_cos_r05/final
# (benchmarks/icd_schedule.sh).
#
# usage: bash benchmarks/icd_batch_rank.sh [OUT_DIR]      (default out/bench/batch_rank)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
OUT=${1:-out/bench/batch_rank}
export HF_HUB_OFFLINE=1
for row in LB128_ft R64_cos_r05; do
  $ICD train icd --config configs/icd-ablation.toml --section "$row" --set threads=2 > "runs/$row.log" 2>&1
done
A=(--adapters LB=runs/ablation/LB128_ft/final --adapters R64=runs/ablation/R64_cos_r05/final --threads 1 --quiet --force)
M=icd:LB,icd:R64
$ICD bench inversion --n 200 --methods "$M" "${A[@]}" --out "$OUT/inversion"
$ICD bench inversion --n 200 --methods "$M" --guidance 1 --tau 0.8 "${A[@]}" --out "$OUT/inversion-guided"
for w in 1 2; do
  $ICD bench generation --n 200 --methods "$M" --guidance $w --renoise 0 "${A[@]}" --out "$OUT/generation-w$w"
done
# editing (RESULTS §3's protocol, quality only) for R64 beside G_cos_r05; the shipped G's row is §3's
$ICD bench editing --n 100 --methods icd:R64,icd:C --adapters R64=runs/ablation/R64_cos_r05/final \
  --adapters C=runs/ablation/G_cos_r05/final --n-timing 1 --quiet --force --out "$OUT/editing"
