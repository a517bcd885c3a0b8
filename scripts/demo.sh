#!/usr/bin/env bash
# `make demo`: the project's main job on the embedded model (no downloads), output under out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
ICD=.venv/bin/icd
$ICD demo --out out --force  # make demo refreshes out/demo.png; a bare `icd demo` never overwrites
