#!/usr/bin/env bash
# The measurements of docs/RESULTS.md §2.4-2.5 for a set of iCD adapter rows beside the 50-step guidance-distilled
# teacher: unguided and guided (w = 1, dynamic CFG τ 0.8) inversion on 200 held-out images, and 4-step generation
# (the paper's deterministic jumps, --renoise 0) at w = 1 and w = 2 on 200 + 200 prompts; one thread, as those tables were measured. REF= (empty) leaves the
# teacher out (measure_icd_row.sh does, for rows compared against an earlier teacher measurement).
#
# usage: bash benchmarks/measure_icd_rows.sh OUT_DIR METHODS [--adapters NAME=DIR ...]
#   e.g. bash benchmarks/measure_icd_rows.sh out/bench/long icd,icd:L --adapters L=runs/ablation/G_long_r05/final
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 OUT_DIR METHODS [--adapters NAME=DIR ...]" >&2; exit 2; }
ICD=${ICD:-.venv/bin/icd}
OUT=$1; M=$2; shift 2
T=(--threads 1 --quiet --force)
M="$M${REF-,gddim50}"
$ICD bench inversion --n 200 --methods "$M" "$@" "${T[@]}" --out "$OUT/inversion"
$ICD bench inversion --n 200 --methods "$M" --guidance 1 --tau 0.8 "$@" "${T[@]}" --out "$OUT/inversion-guided"
for w in 1 2; do
  $ICD bench generation --n 200 --methods "$M" --guidance $w --renoise 0 "$@" "${T[@]}" --out "$OUT/generation-w$w"
done
