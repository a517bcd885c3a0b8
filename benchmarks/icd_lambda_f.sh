#!/usr/bin/env bash
# Issue 3: L_f's weight at the paper's rank 64 (docs/RESULTS.md §2.10), rows of configs/icd-ablation.toml:
#   R64_r05_1k - rank 64 (alpha 32), cosine 1e-4 -> 0 over 1 000 steps, λ_f 1.5, λ_r 0.5 (the control)
#   R64_f30    - the same with λ_f 3.0
# Both start from the shipped guidance-distilled UNet (model = "embedded"), train side by side as one-thread
# processes (4-5.5 s/step depending on the CPU, 67-90 min; started again, each resumes from its last checkpoint),
# then both are measured side by side by benchmarks/measure_icd_row.sh (as §2.9, one thread each): unguided and
# guided inversion, 4-step generation at w = 1 and 2, the forward/reverse hybrids of §2.4 and editing (§3's
# protocol, quality only).
#
# usage: bash benchmarks/icd_lambda_f.sh [OUT_DIR]      (default out/bench/lambda_f)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
OUT=${1:-out/bench/lambda_f}
export HF_HUB_OFFLINE=1
ROWS=(R64_r05_1k R64_f30)
mkdir -p runs "$OUT"
for row in "${ROWS[@]}"; do
  $ICD train icd --config configs/icd-ablation.toml --section "$row" --set threads=1 > "runs/$row.log" 2>&1 &
done
wait
M=benchmarks/measure_icd_row.sh
bash $M runs/ablation/R64_r05_1k/final F15 "$OUT/R64_r05_1k" &
bash $M runs/ablation/R64_f30/final F30 "$OUT/R64_f30" &
wait
