#!/usr/bin/env bash
# Create ./.venv-nnunet (if missing): nnU-Net v2 from PyPI, for the nnU-Net entries of the collection benchmark
# (benchmarks/collection.py runs their steps with this venv's python, --nnunet_python). Its own venv, never the
# project's .venv: nnU-Net pins its own dependencies, and it needs torchvision. PyPI has only CUDA builds of
# torchvision, which do not import with the CPU build of torch that .venv pins ("operator torchvision::nms does not
# exist"), and nnU-Net imports it (through timm) whenever it looks a trainer up by name, as its predictor does; so
# this venv gets torch and torchvision from PyPI as a matching pair (the CUDA build of torch; it runs on CPUs too),
# as pip resolves them for nnunetv2 (about 6.4 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${NNUNET_VENV:-.venv-nnunet}
NNUNET=${NNUNET_VERSION:-2.8.1}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nnunetv2==$NNUNET"
"$VENV/bin/python" -c "import torch, torchvision, nnunetv2; from importlib.metadata import version; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, nnunetv2 {version(\"nnunetv2\")} in $VENV')"
