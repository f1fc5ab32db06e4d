#!/usr/bin/env bash
# The whole test suite plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
# One torch/OpenMP thread per process unless set: on a busy 2-core machine more threads spin-wait.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
export POLYTASK_DATA="${POLYTASK_DATA:-$(cd .. && pwd)/shared/data}"
ruff check
ruff format --check
python -m pytest "$@"
