# Shared option parsing for the entry-point scripts (sourced, not run).
CONFIG=scripts/configs/toy.yaml
NPROC=auto  # processes per step: auto = the visible GPUs (1 on CPU), decided by sp_cam.pipeline
FCN_WEIGHTS=""
PIPELINE_ARGS=()  # options of sp_cam.pipeline passed through (--force STAGE[,STAGE...])
OVERRIDES=()

usage_error() {
  echo "error: $1" >&2
  echo "usage: $0 [--config FILE] [--data-root DIR] [--work-dir DIR] [--nproc auto|N] [--fcn-weights FILE] [--force STAGE[,STAGE...]] [section.key=value ...]" >&2
  exit 2
}

parse_common_args() {
  while (($#)); do
    case "$1" in
      --config) [[ $# -ge 2 ]] || usage_error "--config needs a file"; CONFIG=$2; shift 2 ;;
      --data-root)
        [[ $# -ge 2 ]] || usage_error "--data-root needs a folder"
        [[ -d "$2" ]] || usage_error "--data-root: folder not found: $2"
        OVERRIDES+=("data.dataset=folder" "data.root=$2"); shift 2 ;;
      --work-dir) [[ $# -ge 2 ]] || usage_error "--work-dir needs a folder"; OVERRIDES+=("run.work_dir=$2"); shift 2 ;;
      --nproc)
        [[ $# -ge 2 && ( "$2" == auto || "$2" =~ ^[1-9][0-9]*$ ) ]] || usage_error "--nproc needs auto or a positive integer"
        NPROC=$2; shift 2 ;;
      --fcn-weights) [[ $# -ge 2 ]] || usage_error "--fcn-weights needs a file"; FCN_WEIGHTS=$2; shift 2 ;;
      --force) [[ $# -ge 2 ]] || usage_error "--force needs a stage list, e.g. seg or seg,seg_gt"; PIPELINE_ARGS+=("--force" "$2"); shift 2 ;;
      -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
      *=*) OVERRIDES+=("$1"); shift ;;
      *) usage_error "unknown argument: $1" ;;
    esac
  done
  [[ -f "$CONFIG" ]] || usage_error "--config: file not found: $CONFIG"
}
