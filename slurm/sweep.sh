#!/usr/bin/env bash
# One point of a sweep: `bigbatch sweep <recipe> --grid key=v1,v2 ...` writes <sweep dir>/grid.json and submits
#   sbatch --array=0-<N-1> slurm/sweep.sh <sweep dir>
# Each array task runs slurm/pretrain.sh with its point's overrides into its own run directory, so it is preempted,
# requeued and resumed like any run. `bigbatch sweep --report <sweep dir>` tabulates the final eval losses.
#SBATCH --job-name=bigbatch-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail

sweep_dir="${1:?usage: sbatch --array=0-N slurm/sweep.sh <sweep dir>}"
repo="${SLURM_SUBMIT_DIR:?run this script with sbatch}"
python="${BIGBATCH_PYTHON:-$repo/.venv/bin/python}"
# line 1: the point's run directory; then the recipe and its overrides, one per line
mapfile -t point < <("$python" -m bigbatch sweep --point "$sweep_dir" "$SLURM_ARRAY_TASK_ID")
if [ "${#point[@]}" -lt 2 ]; then
  echo "bigbatch: no point $SLURM_ARRAY_TASK_ID in $sweep_dir/grid.json" >&2
  exit 2
fi
export BIGBATCH_RUN_DIR="${point[0]}"
# exec: this shell becomes pretrain.sh's, so SLURM's warning signal reaches its trap
exec bash "$repo/slurm/pretrain.sh" "${point[@]:1}"
