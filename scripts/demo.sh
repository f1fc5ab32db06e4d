#!/usr/bin/env bash
# The main job: Multi-MNIST, single-task vs shared-bottom vs MMoE, test accuracy and Δm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh base
. .venv/bin/activate
exec polytask demo "$@"
