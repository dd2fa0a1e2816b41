#!/usr/bin/env bash
# Every step of SP-CAM in order: CAM baseline, CAM export, superpixel FCN, SP-CAM, pseudo labels, evaluation.
#
#   bash scripts/train_all.sh [--config FILE] [--data-root DIR] [--work-dir DIR] [--nproc N] [section.key=value ...]
#
# With no arguments: scripts/configs/toy.yaml on the built-in toy dataset (generated on first use), on CPU.
# A step whose outputs exist is skipped, so re-running after a crash continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
parse_common_args "$@"
[[ -n "$FCN_WEIGHTS" ]] && OVERRIDES+=("fcn.weights=$FCN_WEIGHTS")
exec python -m sp_cam.pipeline -c "$CONFIG" --nproc "$NPROC" "${OVERRIDES[@]}"
