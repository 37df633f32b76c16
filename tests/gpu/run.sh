#!/usr/bin/env bash
# The CUDA equivalence tests, as one script for a lent GPU machine. That machine has no network:
# only the repository's own .venv is used (carried with the working tree), nothing is installed.
#
#   tests/gpu/run.sh [extra pytest arguments]
#
# Exits 3 when a GPU is present but the venv's torch cannot use it (a CPU-only wheel, say): the
# tests would all be skipped, and a skip must not read as a pass.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=.venv/bin/python

echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    gpu_present=1
else
    echo "nvidia-smi not found"
    gpu_present=0
fi

echo "== python and torch"
if [ ! -x "$PYTHON" ] || ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "error: $PYTHON cannot import torch; carry the repository's .venv (its base interpreter must exist here too)" >&2
    exit 2
fi
"$PYTHON" - <<'PY'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}")
PY
cuda_ok=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')
if [ "$gpu_present" = 1 ] && [ "$cuda_ok" != 1 ]; then
    echo "error: a GPU is present but torch cannot use it (torch.version.cuda is None for a CPU-only wheel);" \
         "tests/gpu would only skip" >&2
    exit 3
fi

echo "== pytest tests/gpu"
export PYTHONDONTWRITEBYTECODE=1
exec "$PYTHON" -m pytest tests/gpu -p no:cacheprovider -v -s "$@"
