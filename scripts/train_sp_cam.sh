#!/usr/bin/env bash
# SP-CAM training and pseudo labels with ready superpixel-FCN weights: skips stages A, B and 1.
#
#   bash scripts/train_sp_cam.sh [--config FILE] [--data-root DIR] [--work-dir DIR] [--nproc N]
#                                [--fcn-weights FILE] [section.key=value ...]
#
# The default FCN weights (checkpoints/spixel_fcn_toy.pt) were trained on the toy dataset; for VOC12 or COCO14 train
# stage 1 on that data (train_all.sh) or pass the published Q weights with --fcn-weights.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
FCN_WEIGHTS=checkpoints/spixel_fcn_toy.pt
parse_common_args "$@"
if [[ ! -f "$FCN_WEIGHTS" ]]; then
  echo "error: FCN weights not found: $FCN_WEIGHTS (pass --fcn-weights FILE)" >&2
  exit 2
fi
exec python -m sp_cam.pipeline -c "$CONFIG" --nproc "$NPROC" --steps spcam,pseudo,eval \
  "fcn.weights=$FCN_WEIGHTS" "${OVERRIDES[@]}"
