#!/usr/bin/env bash
# SP-CAM training, pseudo labels and DeepLab-V2 with ready superpixel-FCN weights: skips stages A, B and 1; then the
# HTML report (WORK_DIR/report.html).
#
#   bash scripts/train_sp_cam.sh [--config FILE] [--data-root DIR] [--work-dir DIR] [--nproc auto|N]
#                                [--fcn-weights FILE] [--force STAGE[,STAGE...]] [section.key=value ...]
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
python -m sp_cam.pipeline -c "$CONFIG" --nproc "$NPROC" "${PIPELINE_ARGS[@]}" --steps spcam,pseudo,seg,seg_gt,eval \
  "fcn.weights=$FCN_WEIGHTS" "${OVERRIDES[@]}"
exec python -m tools.report -c "$CONFIG" "fcn.weights=$FCN_WEIGHTS" "${OVERRIDES[@]}"
