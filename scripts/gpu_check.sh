#!/usr/bin/env bash
# GPU checks for a session that is lent a device machine: the CUDA tests, then a GPU `polytask fit`
# through the CLI and its evaluation on the CPU. Runs on that machine's own python3 (its torch has
# CUDA); polytask comes from src/. Missing pure-Python packages travel as wheels in .whl (see the
# device tool's README): `pip download --no-deps --only-binary=:all: -d .whl platformdirs`, then
# run with carry [".whl"]:
#     bash scripts/gpu_check.sh            # writes env.txt, pytest.txt, fit.txt under $OUT
# DEVICE=cpu bash scripts/gpu_check.sh tries the script itself on a machine without a GPU.
# One GPU cannot check nccl across processes (each rank needs its own GPU); tests/test_ddp.py then
# runs its gloo (CPU) cases only.
set -uo pipefail
device="${DEVICE:-cuda}"
out="${OUT:-/tmp/polytask-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
"$py" -c "import torch; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok, torch.cuda.get_device_name(0) if ok else '')" 2>&1 | tee "$out/env.txt" || status=1
"$py" -m pytest -q -p no:cacheprovider -rs tests/test_device_cuda.py tests/test_device.py tests/test_ddp.py 2>&1 | tee "$out/pytest.txt" || status=1
"$py" - >/tmp/polytask-gpu-table.csv <<'PY'
import numpy as np
rng = np.random.default_rng(0)
print("a,b,c,y,z")
for _ in range(2000):
    a, b = rng.normal(size=2)
    c = rng.integers(0, 4)
    print(f"{a:.4f},{b:.4f},{c},{int(a + 0.5 * b + rng.normal() * 0.5 > 0)},{2 * a - b + c + rng.normal() * 0.1:.4f}")
PY
rm -rf /tmp/polytask-gpu-run
{
    "$py" -m polytask fit /tmp/polytask-gpu-table.csv --task y:binary --task z:regression --categorical c \
        --model mmoe --balancer upgrad --device "$device" --epochs 5 --quiet -o /tmp/polytask-gpu-run &&
    "$py" -c "import json; d = json.load(open('/tmp/polytask-gpu-run/results.json')); print('trained on', d['device'])" &&
    "$py" -m polytask evaluate /tmp/polytask-gpu-run --device cpu
} 2>&1 | tee "$out/fit.txt" || status=1
exit "$status"
