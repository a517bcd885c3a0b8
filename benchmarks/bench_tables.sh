#!/usr/bin/env bash
# The icd-bench tables of docs/RESULTS.md §3-4 on the embedded model, one command each, in the order they appear.
# The ablation rows C, F and G3 need their trained adapters (bash benchmarks/icd_ablation.sh); without them the
# two inversion tables run with the shipped adapters (icd) and the DDIM references only.
# Run it alone on the machine: the timings are part of the tables.
#
# usage: bash benchmarks/bench_tables.sh [OUT_DIR]      (default out/bench; existing results are replaced)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
OUT=${1:-out/bench}
ROWS=() ; ICDS=icd
for row in C F G3; do
  if [ -f runs/ablation/$row/final/adapters.json ]; then
    ROWS+=(--adapters "$row=runs/ablation/$row/final"); ICDS="icd:$row,$ICDS"
  fi
done

# §3 editing: every method, 100 cases per edit kind (about an hour on 2 CPU cores; NTI is most of it)
$ICD bench editing --n 100 --methods icd,ddim50,ddim4,npi50,nti50 --n-timing 10 --out "$OUT/editing" --force
# §4.1 the issue's speed bar, and §4.2 its determinism: the same command twice
$ICD bench editing --n 20 --methods icd,ddim50 --out "$OUT/edit20" --force
$ICD bench editing --n 20 --methods icd,ddim50 --out "$OUT/edit20-rerun" --force
# §4.3 inversion ablation and step ablation (unguided), §4.4 guided with dynamic CFG
$ICD bench inversion --n 200 --methods "$ICDS,gddim,ddim" --steps-list 1,2,3,4,50 "${ROWS[@]}" \
    --out "$OUT/inversion" --force
$ICD bench inversion --n 200 --methods "$ICDS,gddim50,ddim50" --guidance 1 --tau 0.8 "${ROWS[@]}" \
    --out "$OUT/inversion-guided" --force
# §4.5 generation: 4-step iCD against 50-step DDIM on the guidance-distilled and the original UNet
$ICD bench generation --n 200 --methods icd,gddim50,ddim50 --renoise 0 --out "$OUT/generation" --force
