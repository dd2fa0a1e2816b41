#!/usr/bin/env bash
#SBATCH --job-name=spcam
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=spcam-%j.out
# Example: every step of SP-CAM (as scripts/train_all.sh) over several SLURM nodes, through torchrun's rendezvous.
#
#   cd REPOSITORY && sbatch [--nodes N] [--gpus-per-node G] scripts/slurm_train_all.sh --work-dir /shared/runs/voc12 \
#       [--config FILE] [--data-root DIR] [--nproc auto|N] [--fcn-weights FILE] [section.key=value ...]
#
# On every node one task runs the pipeline driver (python -m sp_cam.pipeline); for each training or inference step
# the drivers launch torchrun with --nnodes=$SLURM_NNODES --node_rank=$SLURM_NODEID --rdzv_backend=c10d
# --rdzv_endpoint=<first node>:$SPCAM_RDZV_PORT, so the step's processes of all nodes form one process group
# (NCCL). The steps run in order; a finished step (its DONE marker) is skipped, so resubmitting the same command
# after a time-out or a crash continues where it stopped.
#
# Assumptions (edit the #SBATCH lines above for your cluster):
# - submitted from the repository root (sbatch runs a copy of this script; $SLURM_SUBMIT_DIR is where it cd's to),
#   with the same Python environment on every node (activate it before sbatch: srun passes the environment on);
# - --work-dir and the dataset are on storage that every node sees at the same path (NFS, Lustre, GPFS): the steps
#   of one node read what the others wrote (checkpoints, CAM and score shards); flock must work across nodes there
#   (NFSv4 and GPFS: yes; Lustre: mounted with -o flock) for the stage locks;
# - one task per node (--ntasks-per-node=1) and --nproc auto (the default): each node runs one process per GPU that
#   SLURM gives it (--gpus-per-node); every node has the same number of GPUs;
# - the nodes reach the first node of the allocation on TCP port $SPCAM_RDZV_PORT (default 29500): torchrun's c10d
#   rendezvous store runs there; each step has its own rendezvous id ($SLURM_JOB_ID plus the step);
# - only the driver of node rank 0 writes the run's own files (config.yaml, the evaluation, metrics.json, the ablation
#   table); the drivers of the other nodes only take part in the torchrun steps, and write nothing else;
# - if the driver of one node fails, srun stops the others (--kill-on-bad-exit): the job ends with the failing
#   node's one-line error in the output file and exit code 2 (bad input) or 1 (a diverged training).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ ! -f sp_cam/pipeline.py ]]; then
  echo "error: run sbatch from the repository root (no sp_cam/pipeline.py in $PWD)" >&2
  exit 2
fi
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  echo "error: not inside a SLURM job; submit with: sbatch scripts/slurm_train_all.sh --work-dir DIR ..." >&2
  exit 2
fi
source scripts/common.sh
parse_common_args "$@"
[[ -n "$FCN_WEIGHTS" ]] && OVERRIDES+=("fcn.weights=$FCN_WEIGHTS")
WORK_DIR_SET=0
for o in "${OVERRIDES[@]}"; do [[ "$o" == run.work_dir=* ]] && WORK_DIR_SET=1; done
((WORK_DIR_SET)) || usage_error "--work-dir is required (a folder on storage every node sees)"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES[0]}
RDZV_ENDPOINT="$HEAD_NODE:${SPCAM_RDZV_PORT:-29500}"
echo "spcam: $SLURM_NNODES nodes, rendezvous at $RDZV_ENDPOINT, config $CONFIG" >&2

# SLURM_NODEID differs per node: expanded by the task on its node, not here.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec python -m sp_cam.pipeline -c "$1" --nproc "$2" --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
    --rdzv-endpoint "$3" --rdzv-id "$SLURM_JOB_ID" "${@:4}"' \
  spcam "$CONFIG" "$NPROC" "$RDZV_ENDPOINT" "${OVERRIDES[@]}"
