#!/usr/bin/env bash
# Create ./.venv-monailabel (if missing): MONAI Label 0.8.5 with this project installed, for labelling with the
# bundles and for the `monailabel` tests. A venv of its own because MONAI Label needs packages the main .venv
# must not get:
# - torchvision, which monailabel imports at start-up. PyPI has only CUDA builds of torchvision, and those do not
#   import with the CPU build of torch that .venv pins ("operator torchvision::nms does not exist"), so this venv
#   gets torch and torchvision from PyPI as a matching pair (the CUDA build of torch; it runs on CPUs too).
# - pydicom<3 (pydicom 3 breaks pydicom-seg's import), and the dicomweb-client and pynetdicom releases that go
#   with it.
# monai itself is the newest release this project allows (monai>=1.5.2,<1.7: 1.6.x), as monailabel 0.8.5 brings.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${MONAILABEL_VENV:-.venv-monailabel}
TORCH=${MONAILABEL_TORCH_VERSION:-2.14.1}
TORCHVISION=${MONAILABEL_TORCHVISION_VERSION:-0.29.1}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==$TORCH" "torchvision==$TORCHVISION"
# keep that pair when the rest is resolved
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TORCHVISION" > "$constraints"
"${pip[@]}" -c "$constraints" "monailabel==0.8.5" "pydicom<3" "dicomweb-client==0.59.3" "pynetdicom<3" -e .
"$VENV/bin/python" -c "import torch, torchvision, monai, monailabel; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, monai {monai.__version__}, monailabel {monailabel.__version__} in $VENV')"
