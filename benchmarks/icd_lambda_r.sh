#!/usr/bin/env bash
# Issue 3: L_r's weight at the paper's rank 64 (docs/RESULTS.md §2.9), rows of configs/icd-ablation.toml:
#   R64_r025  - rank 64 (alpha 32), cosine 1e-4 -> 0 over 1 000 steps, λ_r 0.25
#   R64_r10   - the same with λ_r 1.0
# (R64_cos_r05, λ_r 0.5 over 1 400 steps, is §2.8's.) Both train side by side as one-thread processes (~3.8 s/step,
# ~65 min; started again, each resumes from its last checkpoint), then each is measured as §2.8 (one thread):
# unguided and guided inversion, 4-step generation at w = 1 and 2, editing (§3's protocol, quality only) and the
# forward/reverse hybrids of §2.4. Needs runs/guidance/final (`icd train guidance --config configs/embedded.toml`).
#
# usage: bash benchmarks/icd_lambda_r.sh [OUT_DIR]      (default out/bench/lambda_r)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
PY=${PY:-.venv/bin/python}
OUT=${1:-out/bench/lambda_r}
export HF_HUB_OFFLINE=1
ROWS=(R64_r025 R64_r10)
for row in "${ROWS[@]}"; do
  $ICD train icd --config configs/icd-ablation.toml --section "$row" --set threads=1 > "runs/$row.log" 2>&1 &
done
wait
A=(--adapters R025=runs/ablation/R64_r025/final --adapters R10=runs/ablation/R64_r10/final --threads 1 --quiet --force)
M=icd:R025,icd:R10
$ICD bench inversion --n 200 --methods "$M" "${A[@]}" --out "$OUT/inversion"
$ICD bench inversion --n 200 --methods "$M" --guidance 1 --tau 0.8 "${A[@]}" --out "$OUT/inversion-guided"
for w in 1 2; do
  $ICD bench generation --n 200 --methods "$M" --guidance $w --renoise 0 "${A[@]}" --out "$OUT/generation-w$w"
done
$ICD bench editing --n 100 --methods "$M" "${A[@]}" --n-timing 1 --out "$OUT/editing"
for row in "${ROWS[@]}"; do
  $PY benchmarks/inversion_hybrids.py --n 100 --adapters "runs/ablation/$row/final" | tail -4 > "$OUT/hybrids-$row.txt"
done
