#!/usr/bin/env bash
# Issue 3's long, low-rate run (docs/RESULTS.md §2.5): row G_long_r05 of configs/icd-ablation.toml (λ_r = 0.5,
# cosine 3e-5 -> 0 over 4 000 steps), measured beside the shipped adapters (G), the best earlier row (G_cos_r05,
# from benchmarks/icd_schedule.sh) and the 50-step teacher, on the held-out images and prompts.
# Needs runs/guidance/final (`icd train guidance --config configs/embedded.toml`) and runs/ablation/G_cos_r05/final.
# Training: one two-thread process, ~1.85 s/step, about 2 h; it resumes from its last checkpoint when started
# again (this run was trained over two sessions). Measurements use one thread, as §2.2-2.4's did.
#
# usage: bash benchmarks/icd_long.sh [OUT_DIR]      (default out/bench/long)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
OUT=${1:-out/bench/long}
$ICD train icd --config configs/icd-ablation.toml --section G_long_r05 --set threads=2 > runs/G_long_r05.log 2>&1
bash benchmarks/measure_icd_rows.sh "$OUT" icd,icd:L,icd:C \
  --adapters L=runs/ablation/G_long_r05/final --adapters C=runs/ablation/G_cos_r05/final
