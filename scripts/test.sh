#!/usr/bin/env bash
# The whole test suite plus ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
export POLYTASK_DATA="${POLYTASK_DATA:-$(cd .. && pwd)/shared/data}"
ruff check
ruff format --check
python -m pytest "$@"
