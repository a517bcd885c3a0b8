#!/usr/bin/env bash
# Issue 3's learning-rate experiment (docs/RESULTS.md §2.4): the full method G trained with a cosine-decayed learning
# rate, over 1 800 steps (row G_cos), over 1 400 steps with λ_r = 0.5 (G_cos_r05) and over G's own 600 steps
# (G_cos600), measured against the shipped adapters (G) and the 50-step teacher on the held-out images and prompts.
# Needs runs/guidance/final (`icd train guidance --config configs/embedded.toml`).
# Two one-thread trainings run side by side (~3.1 s/step each: about 95 + 30 min on 2 cores); the measurements use
# one thread, as the table's numbers did. Every training resumes from its last checkpoint when started again.
#
# usage: bash benchmarks/icd_schedule.sh [OUT_DIR]      (default out/bench/schedule)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
OUT=${1:-out/bench/schedule}
ABL=configs/icd-ablation.toml
train() { $ICD train icd --config $ABL --section "$1" --set threads=1 > "runs/$1.log" 2>&1; }
(train G_cos; train G_cos600) &
train G_cos_r05 &
wait
bash benchmarks/measure_icd_rows.sh "$OUT" icd,icd:G_cos,icd:G_cos_r05,icd:G_cos600 \
  --adapters G_cos=runs/ablation/G_cos/final --adapters G_cos_r05=runs/ablation/G_cos_r05/final \
  --adapters G_cos600=runs/ablation/G_cos600/final
