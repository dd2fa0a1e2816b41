#!/usr/bin/env bash
# Every step of SP-CAM in order: CAM baseline, CAM export, superpixel FCN, SP-CAM, pseudo labels, DeepLab-V2 on the
# pseudo labels (and on GT when seg.gt_reference), evaluation; then the HTML report (WORK_DIR/report.html).
#
#   bash scripts/train_all.sh [--config FILE] [--data-root DIR] [--work-dir DIR] [--nproc auto|N]
#                             [--fcn-weights FILE] [--force STAGE[,STAGE...]] [section.key=value ...]
#
# With no arguments: scripts/configs/toy.yaml on the built-in toy dataset (generated on first use), on CPU.
# A step whose outputs exist is skipped, so re-running after a crash continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
parse_common_args "$@"
[[ -n "$FCN_WEIGHTS" ]] && OVERRIDES+=("fcn.weights=$FCN_WEIGHTS")
python -m sp_cam.pipeline -c "$CONFIG" --nproc "$NPROC" "${PIPELINE_ARGS[@]}" "${OVERRIDES[@]}"
exec python -m tools.report -c "$CONFIG" "${OVERRIDES[@]}"
