#!/usr/bin/env bash
# The GPU checks of a session lent a GPU machine, in under 8 minutes: the `gpu` tests (scripts/gpu_checks.sh), then
# bench/gpu_check.py on the real R1-Distill-Qwen-1.5B architecture in bfloat16 (throughput, DP / non-private, peak
# memory vs `fedsecure model plan`). Needs a CUDA build of torch in .venv. Figures go to $OUT (or /tmp) as JSON.
#   bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
timeout 240 scripts/gpu_checks.sh || echo "gpu tests: exit $?"
timeout 240 .venv/bin/python bench/gpu_check.py --config r1-distill-qwen-1.5b --dtype bfloat16 --batch 8 --seq 512 \
  --steps 5 --out "$out/gpu_check.json"
