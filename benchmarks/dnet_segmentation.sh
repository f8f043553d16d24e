#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# D-Net figures for the bundle card, on the CPU:
#   1. forward and forward+backward time and peak memory of the paper's configuration (widths 48-768, 2 DLK blocks
#      per level, 1 input channel) for one 64^3 and one 96^3 input, without and with activation checkpointing;
#   2. the same for the bundle's default network on one training batch (2 patches of 32x64x32);
#   3. the validation Dice and HD95 of the bundle trained with its default configuration for a fixed wall-clock
#      budget on ../shared/data/Task04_Hippocampus (benchmarks/train_budget.py).
#
#   bash benchmarks/dnet_segmentation.sh [MINUTES]     (default 15 minutes of training; run from anywhere)
#   SKIP_TRAIN=1 bash benchmarks/dnet_segmentation.sh  (1 and 2 only, about 10 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
MINUTES=${1:-15}

# 1. paper configuration: DNet's defaults, the paper's 16 output classes of the official code's count test
for ckpt in false true; do
    "$PYTHON" benchmarks/speed.py networks.DNet "{\"spatial_dims\": 3, \"in_channels\": 1, \"out_channels\": 16, \"use_checkpointing\": $ckpt}" \
        --shapes 1,1,64,64,64 1,1,96,96,96 --repeats 1
done

# 2. the bundle's default network_def (bundles/dnet_segmentation/spec.json), one training batch
"$PYTHON" benchmarks/speed.py networks.DNet '{"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
    "channels": [16, 32, 64, 128, 256], "drop_path_rate": 0.1}' --shapes 2,1,32,64,32 --repeats 2

# 3. fixed-budget training with the bundle's defaults (options before the bundle name, overrides after --)
if [[ -z "${SKIP_TRAIN:-}" ]]; then
    "$PYTHON" benchmarks/train_budget.py --minutes "$MINUTES" dnet_segmentation -- --num_workers 2
fi
