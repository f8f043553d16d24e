#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# TransUNet figures for the bundle card: CPU forward / forward+backward time of the paper's R50-ViT-B/16 at 224^2
# and of the bundle's default model at its slice size, then a fixed-budget training run on the default task.
#
#   bash benchmarks/transunet_segmentation.sh [EPOCHS]     (default 8 epochs; run from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
EPOCHS=${1:-8}

# paper configuration (these are the TransUNet defaults): 3 input channels, 9 Synapse classes
"$PYTHON" benchmarks/speed.py networks.TransUNet '{"in_channels": 3, "out_channels": 9, "img_size": 224}' \
    --shapes 1,3,224,224

# the bundle's default network_def (bundles/transunet_segmentation/spec.json): one slice, and one training batch
# (batch_size 4 volumes x samples_per_case 8 slices)
"$PYTHON" benchmarks/speed.py networks.TransUNet '{"in_channels": 1, "out_channels": 3, "img_size": [48, 64],
    "hidden_size": 256, "num_layers": 4, "num_heads": 8, "mlp_dim": 1024, "resnet_block_units": [2, 2, 2],
    "resnet_width_factor": 0.5, "decoder_channels": [128, 64, 32, 16], "decoder_head_channels": 256}' \
    --shapes 1,1,48,64 32,1,48,64

# options before the bundle name: argparse cannot take overrides after "--" once an option follows the name
"$PYTHON" benchmarks/train_budget.py --epochs "$EPOCHS" transunet_segmentation -- --num_workers 0
