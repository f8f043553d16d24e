#!/usr/bin/env bash
# Create a venv (./.venv, or $VENV) if missing and install the project with its test extras.
# torch is installed first and pinned: without it pip would resolve monai's torch requirement to a CUDA build
# of several GB; torch 2.13.0 is the CPU build (and CUDA builds work too if already installed).
# MONAI is the newest release setup.cfg allows, or $MONAI_VERSION (e.g. 1.5.2, the oldest supported).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${pip[@]}" -e ".[test]" ${MONAI_VERSION:+"monai[fire]==$MONAI_VERSION"}
"$VENV/bin/python" -c "import torch, monai; print(f'torch {torch.__version__}, monai {monai.__version__} in $VENV')"
