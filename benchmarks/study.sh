#!/usr/bin/env bash
# One recipe for the measurements of docs/RESULTS.md and of the studies in docs/experiments/ (it replaces the
# per-experiment scripts those studies were first run with; docs/experiments/README.md maps each to its commands).
#
# usage: bash benchmarks/study.sh COMMAND ...
#   train ROW [ROW ...]                      train iCD rows side by side, one process each, $THREADS threads each
#                                            (default 1); a row is a section of configs/icd-ablation.toml,
#                                            configs/icd-gpu.toml or docs/experiments/*.toml, found by its name
#                                            ($CONFIG names the file instead); log in runs/ROW.log; a started row
#                                            resumes from its last checkpoint. Extra `--set k=v` options: $SET.
#   compare OUT METHODS [--adapters N=DIR ...]
#                                            unguided and guided (w = 1, dynamic CFG τ 0.8) inversion on 200 held-out
#                                            images and 4-step generation (the paper's deterministic jumps,
#                                            --renoise 0) at w = 1 and 2 on 200 + 200 captions, one thread, beside
#                                            the 50-step guidance-distilled teacher (gddim50; REF= leaves it out)
#   measure DIR NAME OUT                     every measurement of one trained row: `compare` without the teacher,
#                                            the forward/reverse hybrids (100 images) and editing (100 cases per
#                                            kind, quality only); two rows measure side by side on two cores
#   tables OUT [PART ...]                    the tables of docs/RESULTS.md; PART: inversion, editing, speed,
#                                            generation, components, steps (default: all, in that order).
#                                            Run alone on the machine: the timings are part of the tables.
#   rows                                     list every trainable row and its file
# Environment: ICD (default .venv/bin/icd), PY (default .venv/bin/python); DRY=1 prints the commands instead of
# running them (so does ICD=echo PY=echo, as the older scripts allowed).
#
# examples:
#   bash benchmarks/study.sh train R64_f30                        # the shipped adapters' recipe (~95 min, 1 thread)
#   bash benchmarks/study.sh measure runs/ablation/R64_f30/final F30 out/bench/lambda_f/R64_f30
#   bash benchmarks/study.sh compare out/bench/schedule icd:G_cos --adapters G_cos=runs/ablation/G_cos/final
#   bash benchmarks/study.sh tables out/bench generation
set -euo pipefail
cd "$(dirname "$0")/.."
ICD=${ICD:-.venv/bin/icd}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1
ROW_FILES=(configs/icd-ablation.toml configs/icd-gpu.toml docs/experiments/*.toml)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
die() { echo "study.sh: error: $*" >&2; exit 2; }
# run CMD...: run it, or print it under DRY=1
run() { if [ -n "${DRY:-}" ]; then echo "+ $*"; else "$@"; fi; }

row_file() {  # the one file holding section [ROW]
  local found=()
  for f in "${ROW_FILES[@]}"; do grep -q "^\[$1\]" "$f" && found+=("$f"); done
  [ ${#found[@]} -eq 1 ] || die "row $1 is in ${#found[@]} files (${found[*]:-none}); see: bash $0 rows"
  echo "${found[0]}"
}

cmd_rows() {
  for f in "${ROW_FILES[@]}"; do
    printf '%-46s %s\n' "$f" "$(sed -n 's/^\[\([A-Za-z0-9_]*\)\].*/\1/p' "$f" | tr '\n' ' ')"
  done
}

cmd_train() {
  [ $# -ge 1 ] || usage
  local pids=() row config
  [ -n "${DRY:-}" ] || mkdir -p runs
  for row in "$@"; do
    config=${CONFIG:-$(row_file "$row")}
    # shellcheck disable=SC2086
    if [ -n "${DRY:-}" ]; then
      run "$ICD" train icd --config "$config" --section "$row" --set "threads=${THREADS:-1}" ${SET:-} "> runs/$row.log"
    else
      run "$ICD" train icd --config "$config" --section "$row" --set "threads=${THREADS:-1}" ${SET:-} \
        > "runs/$row.log" 2>&1 &
      pids+=($!)
    fi
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return $rc
}

cmd_compare() {
  [ $# -ge 2 ] || usage
  local out=$1 m=$2 w
  shift 2
  m="$m${REF-,gddim50}"
  local t=(--threads 1 --quiet --force)
  run "$ICD" bench inversion --n 200 --methods "$m" "$@" "${t[@]}" --out "$out/inversion"
  run "$ICD" bench inversion --n 200 --methods "$m" --guidance 1 --tau 0.8 "$@" "${t[@]}" --out "$out/inversion-guided"
  for w in 1 2; do
    run "$ICD" bench generation --n 200 --methods "$m" --guidance $w --renoise 0 "$@" "${t[@]}" \
      --out "$out/generation-w$w"
  done
}

cmd_measure() {
  [ $# -eq 3 ] || die "usage: study.sh measure ADAPTERS_DIR NAME OUT_DIR"
  local dir=$1 name=$2 out=$3
  [ -n "${DRY:-}" ] || [ -f "$dir/adapters.json" ] || die "$dir has no adapters.json (not an iCD adapters folder)"
  run mkdir -p "$out"
  REF='' cmd_compare "$out" "icd:$name" --adapters "$name=$dir"
  if [ -n "${DRY:-}" ]; then
    run "$PY" benchmarks/inversion_hybrids.py --n 100 --adapters "$dir" "| tail -4 > $out/hybrids.txt"
  else
    "$PY" benchmarks/inversion_hybrids.py --n 100 --adapters "$dir" | tail -4 > "$out/hybrids.txt"
  fi
  run "$ICD" bench editing --n 100 --methods "icd:$name" --adapters "$name=$dir" --threads 1 --quiet --force \
    --n-timing 1 --out "$out/editing"
}

tables_inversion() {  # §1: the shipped adapters, the ablation rows that are trained, DDIM at 1-4 and 50 steps
  local rows=() icds="" row
  for row in C F G G3; do
    if [ -f "runs/ablation/$row/final/adapters.json" ]; then
      rows+=(--adapters "$row=runs/ablation/$row/final"); icds="${icds}icd:$row,"
    fi
  done
  run "$ICD" bench inversion --n 200 --methods "${icds}icd,gddim,ddim" --steps-list 1,2,3,4,50 "${rows[@]}" \
    --out "$1/inversion" --force
  run "$ICD" bench inversion --n 200 --methods "${icds}icd,gddim50,ddim50" --guidance 1 --tau 0.8 "${rows[@]}" \
    --out "$1/inversion-guided" --force
}

tables_editing() {  # §2: every method, 100 cases per edit kind (about an hour on 2 CPU cores; NTI is most of it)
  run "$ICD" bench editing --n 100 --methods icd,ddim50,ddim4,npi50,nti50 --n-timing 10 --out "$1/editing" --force
}

tables_steps() {  # §10: the step ablation, iCD K+K (rows S1, S2, S3, S6 that are trained, and the shipped 4+4)
  # beside DDIM K+K and 50+50: inversion on 200 images, editing on 100 cases per kind, one table and one plot
  local rows=() icds="" row
  for row in S1 S2 S3 S6; do
    if [ -f "runs/ablation/$row/final/adapters.json" ]; then
      rows+=(--adapters "$row=runs/ablation/$row/final"); icds="${icds}icd:$row,"
    fi
  done
  run "$ICD" bench inversion --n 200 --methods "${icds}icd,ddim" --steps-list 1,2,3,4,6,50 "${rows[@]}" \
    --threads 1 --out "$1/steps-inversion" --force
  run "$ICD" bench editing --n 100 --methods "${icds}icd,ddim" --steps-list 1,2,3,4,6,50 "${rows[@]}" \
    --threads 1 --n-timing 1 --out "$1/steps-editing" --force
  run "$PY" benchmarks/step_ablation.py --inversion "$1/steps-inversion" --editing "$1/steps-editing" --out "$1/steps"
}

tables_speed() {  # §4: the speed bar on 80 cases, twice (the second run checks determinism)
  run "$ICD" bench editing --n 20 --methods icd,ddim50 --out "$1/edit20" --force
  run "$ICD" bench editing --n 20 --methods icd,ddim50 --out "$1/edit20-rerun" --force
}

tables_generation() {  # §3: both samplers beside the teacher, w = 1 and 2, 500 + 500 captions, one thread (~25 min)
  local w t=(--n 500 --threads 1 --quiet --force)
  for w in 1 2; do
    run "$ICD" bench generation --methods icd,gddim50 --renoise 0 --guidance $w "${t[@]}" --out "$1/renoise/w$w"
    run "$ICD" bench generation --methods icd --renoise 1 --guidance $w "${t[@]}" --out "$1/renoise/w$w-r1"
  done
}

tables_components() {  # §5: guidance distillation (generation, noise error), the VAE and the teacher
  local w
  run "$ICD" bench generation --n 200 --methods gddim50,ddim50 --out "$1/guidance-distillation" --force
  run "$ICD" bench guidance --n 256 --guidance 1 --batch 256 --out "$1/guidance-w1" --force
  run "$ICD" bench inversion --n 500 --methods vae --seed-start 1000000000 --batch 100 --out "$1/vae" --force
  for w in 1 2 4; do
    run "$ICD" bench generation --n 300 --methods ddim50 --guidance $w --batch 64 --out "$1/teacher-w$w" --force
  done
}

cmd_tables() {
  [ $# -ge 1 ] || usage
  local out=$1 part
  shift
  [ $# -gt 0 ] || set -- inversion editing speed generation components steps
  for part in "$@"; do
    case $part in
      inversion|editing|speed|generation|components|steps) "tables_$part" "$out" ;;
      *) die "unknown table $part (inversion, editing, speed, generation, components, steps)" ;;
    esac
  done
}

[ $# -ge 1 ] || usage
command=$1
shift
case $command in
  train|compare|measure|tables|rows) "cmd_$command" "$@" ;;
  -h|--help|help) usage ;;
  *) die "unknown command $command (train, compare, measure, tables, rows)" ;;
esac
