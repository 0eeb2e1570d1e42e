#!/usr/bin/env bash
# The GPU checks of a session lent a GPU machine, in under 9 minutes: the `gpu` tests (scripts/gpu_checks.sh: one
# GPU, or NCCL ranks on two), `fedsecure doctor --json`, then bench/gpu_check.py on the real R1-Distill-Qwen-1.5B
# architecture in bfloat16 (throughput, DP / non-private, peak memory vs `fedsecure model plan`), and on a machine
# with more than one GPU bench/bench_ranks.py over every GPU (NCCL, one rank a GPU) against one GPU. Needs a CUDA
# build of torch in .venv. Figures go to $OUT (or /tmp).
#   bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
timeout 240 scripts/gpu_checks.sh || echo "gpu tests: exit $?"
timeout 240 .venv/bin/python bench/gpu_check.py --config r1-distill-qwen-1.5b --dtype bfloat16 --batch 8 --seq 512 \
  --steps 5 --out "$out/gpu_check.json"
timeout 60 .venv/bin/fedsecure doctor --json > "$out/doctor.json" || echo "doctor: exit $?"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -gt 1 ]; then
  timeout 240 .venv/bin/python bench/bench_ranks.py --device cuda --world "$gpus" --skip-bytes --steps 8 \
    --batch 64 > "$out/bench_ranks_gpu.txt" || echo "bench_ranks: exit $?"
fi
