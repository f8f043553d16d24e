#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with its test extras.
# torch is installed first and pinned: without it pip would resolve monai's torch requirement to a CUDA build
# of several GB; torch 2.13.0 is the CPU build (and CUDA builds work too if already installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -c "import torch, monai; print(f'torch {torch.__version__}, monai {monai.__version__} in .venv')"
