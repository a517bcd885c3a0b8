#!/usr/bin/env bash
# Issue 3: L_f's weight at the paper's rank 64 (docs/RESULTS.md §2.10), rows of configs/icd-ablation.toml:
#   R64_r05_1k - rank 64 (alpha 32), cosine 1e-4 -> 0 over 1 000 steps, λ_f 1.5, λ_r 0.5 (the control)
#   R64_f30    - the same with λ_f 3.0
# Both start from the shipped guidance-distilled UNet (model = "embedded"), train side by side as one-thread
# processes (~4 s/step, ~67 min; started again, each resumes from its last checkpoint), then each is measured as
# §2.9 (one thread): unguided and guided inversion, 4-step generation at w = 1 and 2, editing (§3's protocol,
# quality only) and the forward/reverse hybrids of §2.4.
#
# usage: bash benchmarks/icd_lambda_f.sh [OUT_DIR]      (default out/bench/lambda_f)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
PY=${PY:-.venv/bin/python}
OUT=${1:-out/bench/lambda_f}
export HF_HUB_OFFLINE=1
ROWS=(R64_r05_1k R64_f30)
mkdir -p runs "$OUT"
for row in "${ROWS[@]}"; do
  $ICD train icd --config configs/icd-ablation.toml --section "$row" --set threads=1 > "runs/$row.log" 2>&1 &
done
wait
A=(--adapters F15=runs/ablation/R64_r05_1k/final --adapters F30=runs/ablation/R64_f30/final --threads 1 --quiet --force)
M=icd:F15,icd:F30
$ICD bench inversion --n 200 --methods "$M" "${A[@]}" --out "$OUT/inversion"
$ICD bench inversion --n 200 --methods "$M" --guidance 1 --tau 0.8 "${A[@]}" --out "$OUT/inversion-guided"
for w in 1 2; do
  $ICD bench generation --n 200 --methods "$M" --guidance $w "${A[@]}" --out "$OUT/generation-w$w"
done
$ICD bench editing --n 100 --methods "$M" "${A[@]}" --n-timing 1 --out "$OUT/editing"
for row in "${ROWS[@]}"; do
  $PY benchmarks/inversion_hybrids.py --n 100 --adapters "runs/ablation/$row/final" | tail -4 > "$OUT/hybrids-$row.txt"
done
