#!/usr/bin/env bash
# Create ./.venv-deploy (if missing): MONAI Deploy App SDK 4.0.0 with this project installed, for the example
# application in deploy/ and for tests/test_monai_deploy.py. A venv of its own because the SDK must not enter
# .venv:
# - it installs into MONAI's own package folder (monai/deploy), and `import monai` then imports it, and with it
#   NVIDIA Holoscan (the SDK's runtime; it runs on CPUs too, with a warning that CUDA is missing);
# - it brings about 3 GB: Holoscan, CuPy, CUDA Python, Triton's client.
# torch is the CPU build .venv pins, installed first so that the rest keeps it; MONAI is the newest this project
# allows (1.6.x), highdicom comes with the [dicom] extra (the SDK's DICOM SEG writer needs it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${DEPLOY_VENV:-.venv-deploy}
SDK=${MONAI_DEPLOY_VERSION:-4.0.0}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${pip[@]}" "monai-deploy-app-sdk==$SDK" -e ".[dicom]"
"$VENV/bin/python" -W ignore -c "import holoscan, monai, monai.deploy, torch; print(f'monai-deploy-app-sdk {monai.deploy.__version__}, holoscan {holoscan.__version__}, torch {torch.__version__}, monai {monai.__version__} in $VENV')" 2>&1 | tail -1
