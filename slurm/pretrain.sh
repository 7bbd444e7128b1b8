#!/usr/bin/env bash
# Pretrain a bigbatch recipe on a SLURM cluster:
#   sbatch --nodes=8 --gpus-per-node=8 slurm/pretrain.sh <recipe> [--section.key=value ...]
# One task per node; each runs torchrun (default) with one process per GPU, or set BIGBATCH_LAUNCHER=deepspeed.
# Before the time limit SLURM signals this shell (USR1, 180 s ahead): the ranks finish the step, checkpoint, and
# the job requeues itself; the next start resumes from that checkpoint by itself (SLURM_RESTART_COUNT > 0).
# Environment: BIGBATCH_PYTHON (default: <repo>/.venv/bin/python), BIGBATCH_RUN_DIR (default:
# <repo>/runs/<recipe>-<job id>), BIGBATCH_LAUNCHER (torchrun | deepspeed), BIGBATCH_PORT.
#SBATCH --job-name=bigbatch
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ $# -lt 1 ]; then
  echo "usage: sbatch slurm/pretrain.sh <recipe> [--section.key=value ...]" >&2
  exit 2
fi
recipe="$1"
shift
# sbatch runs a copy of this script from its spool directory: the repository is where the job was submitted from.
repo="${SLURM_SUBMIT_DIR:?run this script with sbatch}"
python="${BIGBATCH_PYTHON:-$repo/.venv/bin/python}"
launcher="${BIGBATCH_LAUNCHER:-torchrun}"
run_dir="${BIGBATCH_RUN_DIR:-$repo/runs/$(basename "$recipe" .py)-$SLURM_JOB_ID}"
nproc="${SLURM_GPUS_ON_NODE:-1}"
master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
port="${BIGBATCH_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MASTER_ADDR="$master" MASTER_PORT="$port"  # for processes srun starts directly (the deepspeed launcher)
unset RANK WORLD_SIZE LOCAL_RANK  # each rank's own come from torchrun or from SLURM_PROCID, never from this shell

mkdir -p "$run_dir"
echo "bigbatch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES nodes x $nproc, run $run_dir"
# The warning signal reaches this shell only (B:); the ranks see it as a STOP file and stop together.
trap 'echo "bigbatch: stop requested"; touch "$run_dir/STOP"' USR1 TERM

case "$launcher" in
  torchrun)
    srun --kill-on-bad-exit=1 "$python" -m torch.distributed.run \
      --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$nproc" \
      --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$master:$port" \
      -m bigbatch train "$recipe" --run-dir "$run_dir" "$@" &
    ;;
  deepspeed)
    hostfile="$(mktemp "${TMPDIR:-/tmp}/bigbatch-hostfile.XXXXXX")"  # not in the run directory: it must stay empty
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$nproc/" > "$hostfile"
    "$(dirname "$python")/deepspeed" --hostfile "$hostfile" --launcher slurm --no_ssh_check \
      --master_addr "$master" --master_port "$port" \
      --module bigbatch train "$recipe" --run-dir "$run_dir" "$@" &
    ;;
  *)
    echo "BIGBATCH_LAUNCHER=$launcher is not torchrun or deepspeed" >&2
    exit 2
    ;;
esac
pid=$!
# A trapped signal interrupts `wait`; wait again until the launcher itself has exited.
status=0
wait "$pid" || status=$?
while kill -0 "$pid" 2>/dev/null; do
  status=0
  wait "$pid" || status=$?
done
if [ -f "$run_dir/PREEMPTED" ]; then
  echo "bigbatch: checkpoint saved at $(cat "$run_dir/PREEMPTED"); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
