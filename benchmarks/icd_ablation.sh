#!/usr/bin/env bash
# Train every row of the iCD ablation (configs/icd-ablation.toml) and the shipped adapters (configs/embedded.toml
# [icd]), then measure them with benchmarks/embedded_icd.py. Needs runs/guidance/final (`icd train guidance`).
#
# On a 2-core CPU two one-thread trainings run side by side (more throughput than one two-thread run). Stream A
# trains row G and then runs the shipped recipe (configs/embedded.toml [icd]) from G's last checkpoint: the shipped
# recipe is row G (same seed, data, steps and constant learning rate), so this only writes runs/icd/final; raise
# its `steps` to continue training beyond G. Stream B trains C, F and G3.
# Every run resumes from its last checkpoint when this script is started again.
#
# usage: bash benchmarks/icd_ablation.sh [OUT_DIR]     (default out/bench/icd)
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
PY=${PY:-.venv/bin/python}
OUT=${1:-out/bench/icd}
ABL=configs/icd-ablation.toml
mkdir -p runs/ablation runs/cache
[ -e runs/ablation/cache ] || ln -s ../cache runs/ablation/cache  # one latent cache for all rows

stream_a() {
  $ICD train icd --config $ABL --section G --set threads=1
  if [ ! -f runs/icd/latest ]; then
    mkdir -p runs/icd && cp -r runs/ablation/G/step-000600 runs/ablation/G/log.csv runs/icd/
    echo step-000600 > runs/icd/latest
  fi
  $ICD train icd --config configs/embedded.toml --set threads=1
}

stream_b() {
  for row in C F G3; do
    $ICD train icd --config $ABL --section $row --set threads=1
  done
}

stream_a > runs/ablation/stream-a.log 2>&1 &
a=$!
stream_b > runs/ablation/stream-b.log 2>&1 &
b=$!
wait $a $b

# teacher references (guidance distillation, 50-step generation, DDIM inversion), then the iCD rows
$PY benchmarks/embedded_icd.py --model runs/guidance/final --taus 0.7,0.8 --n 200 --n-prompts 200 \
  --out "$OUT-teacher"
$PY benchmarks/embedded_icd.py --model runs/guidance/final --skip eps,teacher,ddim \
  --icd C=runs/ablation/C/final --icd F=runs/ablation/F/final --icd G=runs/ablation/G/final \
  --icd G3=runs/ablation/G3/final --icd shipped=runs/icd/final --n 200 --n-prompts 200 --out "$OUT"
