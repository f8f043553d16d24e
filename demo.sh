#!/usr/bin/env bash
# Quick start: set up .venv, make synthetic demo data in data/demo/, then train, evaluate and run inference
# with the UNet bundle on it (CPU, no download, about two minutes), ending with a table of Dice and HD95.
# Extra arguments go to bundletools.demo (e.g. --bundle, --epochs; see .venv/bin/python -m bundletools.demo --help).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh
.venv/bin/python -m bundletools.demo "$@"
