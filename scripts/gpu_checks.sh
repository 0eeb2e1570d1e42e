#!/usr/bin/env bash
# The tests marked `gpu`, for a session lent a GPU machine (they skip elsewhere). Run from the repository root:
#   scripts/gpu_checks.sh            (uses .venv, or installs it as `make test` does)
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/python || make install >/dev/null  # a device machine may have no network: carry .venv
nvidia-smi --query-gpu=name,driver_version,temperature.gpu,power.draw --format=csv || true
.venv/bin/python -m pytest -q -ra -m gpu -p no:cacheprovider "$@"
