#!/usr/bin/env bash
# Pretrain a bigbatch recipe on a SLURM cluster:
#   sbatch --nodes=8 --gpus-per-node=8 slurm/pretrain.sh <recipe> [--section.key=value ...]
# One task per node; each runs torchrun (default) with one process per GPU, or set BIGBATCH_LAUNCHER=deepspeed.
# Before the time limit SLURM signals this shell (USR1, 180 s ahead): the ranks finish the step, checkpoint, and
# the job requeues itself; the next start resumes from that checkpoint by itself (SLURM_RESTART_COUNT > 0).
# The run directory: --run-dir DIR (or --run-dir=DIR) among the arguments, or BIGBATCH_RUN_DIR, or by default
# <repo>/runs/<recipe>-<job id>; a relative one is taken from the directory sbatch was run in. The ranks train there
# and this shell writes its STOP there; --run-dir and BIGBATCH_RUN_DIR naming two directories are refused.
# Environment: BIGBATCH_PYTHON (default: <repo>/.venv/bin/python if there is one, else python3 on PATH: an installed
# bigbatch), BIGBATCH_RUN_DIR, BIGBATCH_LAUNCHER (torchrun | deepspeed), BIGBATCH_PORT.
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
if [ -n "${BIGBATCH_PYTHON:-}" ]; then
  python="$BIGBATCH_PYTHON"
elif [ -x "$repo/.venv/bin/python" ]; then
  python="$repo/.venv/bin/python"
else
  python="$(command -v python3)" || {
    echo "bigbatch: error: $repo has no .venv and no python3 is on PATH; set BIGBATCH_PYTHON to the Python that bigbatch is installed in." >&2
    exit 2
  }
fi
launcher="${BIGBATCH_LAUNCHER:-torchrun}"

# One run directory for this shell (its STOP file) and the ranks: the user's --run-dir is taken out of the arguments
# and handed on resolved, so a requeued job (same arguments, same submit directory) resumes in the same place.
run_dir=""
run_dir_from=""
choose_run_dir() {  # $1: the directory as given, $2: how it was given
  local resolved
  resolved="$(cd "$repo" && realpath -m -- "$1")"
  if [ -n "$run_dir" ] && [ "$resolved" != "$run_dir" ]; then
    echo "bigbatch: error: $run_dir_from and $2 name different run directories; give the run directory one way only." >&2
    exit 2
  fi
  run_dir="$resolved"
  run_dir_from="$2"
}
if [ -n "${BIGBATCH_RUN_DIR:-}" ]; then
  choose_run_dir "$BIGBATCH_RUN_DIR" "BIGBATCH_RUN_DIR=$BIGBATCH_RUN_DIR"
fi
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --run-dir | --run-dir=)
      if [ "$1" = "--run-dir=" ] || [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "bigbatch: error: --run-dir is given without a directory; pass --run-dir DIR." >&2
        exit 2
      fi
      choose_run_dir "$2" "--run-dir $2"
      shift 2
      ;;
    --run-dir=*)
      choose_run_dir "${1#--run-dir=}" "$1"
      shift
      ;;
    *)
      args+=("$1")
      shift
      ;;
  esac
done
if [ -z "$run_dir" ]; then
  run_dir="$repo/runs/$(basename "$recipe" .py)-$SLURM_JOB_ID"
fi
export BIGBATCH_RUN_DIR="$run_dir"  # what `bigbatch train` reads too, should a rank look at its environment
nproc="${SLURM_GPUS_ON_NODE:-1}"
# sed reads the whole list: `head` would leave scontrol writing into a closed pipe (SIGPIPE, fatal under pipefail)
master="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
port="${BIGBATCH_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export MASTER_ADDR="$master" MASTER_PORT="$port"  # for processes srun starts directly (the deepspeed launcher)
unset RANK WORLD_SIZE LOCAL_RANK  # each rank's own come from torchrun or from SLURM_PROCID, never from this shell

mkdir -p "$run_dir"
# PREEMPTED must come from this start: one left by the previous start would requeue a start that failed, forever.
rm -f "$run_dir/PREEMPTED"
start="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"
echo "bigbatch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES nodes x $nproc, run $run_dir"
# The warning signal reaches this shell only (B:); the ranks see it as a STOP file and stop together. The file names
# this start, so that a later start of the job does not take it for a request of its own.
trap 'echo "bigbatch: stop requested"; printf "%s\n" "$start" > "$run_dir/STOP"' USR1 TERM

case "$launcher" in
  torchrun)
    srun --kill-on-bad-exit=1 "$python" -m torch.distributed.run \
      --nnodes "$SLURM_JOB_NUM_NODES" --nproc-per-node "$nproc" \
      --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$master:$port" \
      -m bigbatch train "$recipe" --run-dir "$run_dir" ${args[@]+"${args[@]}"} &
    ;;
  deepspeed)
    hostfile="$(mktemp "${TMPDIR:-/tmp}/bigbatch-hostfile.XXXXXX")"  # not in the run directory: it must stay empty
    scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$nproc/" > "$hostfile"
    "$(dirname "$python")/deepspeed" --hostfile "$hostfile" --launcher slurm --no_ssh_check \
      --master_addr "$master" --master_port "$port" \
      --module bigbatch train "$recipe" --run-dir "$run_dir" ${args[@]+"${args[@]}"} &
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
if [ "$status" -eq 4 ]; then
  # A storage fault (full disk, unwritable or damaged run directory): a requeue would fail the same way.
  echo "bigbatch: storage fault (exit 4), the sentence above says what; not requeued: free space, then submit the same command again (it resumes from the last complete checkpoint)"
fi
exit "$status"
