#!/usr/bin/env bash
# A real 2-node SLURM cluster on this machine, for tests/test_slurm.py (and CI): munge, slurmctld, and two slurmd
# (node1, node2) on localhost, configured in their own directory so they never touch another SLURM.
#   tests/slurm_cluster.sh start [DIR]   prints SLURM_CONF=<DIR>/slurm.conf when the nodes are up
#   tests/slurm_cluster.sh stop [DIR]
# Needs root and Debian's slurm-wlm and munge packages (apt-get install slurm-wlm munge).
set -euo pipefail

dir="${2:-${BIGBATCH_SLURM_DIR:-/tmp/bigbatch-slurm}}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

stop() {
  if [ -f "$conf" ]; then
    scancel --quiet --user "$(id -un)" 2>/dev/null || true
  fi
  for pidfile in "$dir"/slurmd-node1.pid "$dir"/slurmd-node2.pid "$dir"/slurmctld.pid; do
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
}

start() {
  for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "slurm_cluster.sh: $tool not found; apt-get install slurm-wlm munge" >&2; exit 2; }
  done
  stop
  # (zombies left by earlier daemons do not count: -r lists the live states only)
  if pgrep -x -r D,R,S slurmctld >/dev/null || pgrep -x -r D,R,S slurmd >/dev/null; then
    echo "slurm_cluster.sh: a SLURM daemon not started from $dir is running; stop it first (this script never touches it)" >&2
    exit 1
  fi
  mkdir -p "$dir/state" "$dir/spool/node1" "$dir/spool/node2"
  grep -qE '^127\.0\.0\.1[[:space:]].*\bnode1\b' /etc/hosts || echo "127.0.0.1 node1 node2" >> /etc/hosts
  cpus="$(nproc)"
  cat > "$conf" <<CONF
ClusterName=bigbatchtest
SlurmctldHost=localhost
SlurmctldPort=16817
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
CONF
  if ! pgrep -x -r D,R,S munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- munged
  fi
  slurmctld -f "$conf"
  slurmd -f "$conf" -N node1
  slurmd -f "$conf" -N node2
  for _ in $(seq 60); do
    if [ "$(sinfo --noheader --states=idle --format=%D 2>/dev/null | awk '{s+=$1} END {print s+0}')" = "2" ]; then
      echo "SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  echo "slurm_cluster.sh: the 2 nodes did not come up; see $dir/*.log" >&2
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
