#!/usr/bin/env bash
# Multi-node GPU training: one JAX process per node, each using all of its GPUs.
#
# With ssh (a shared filesystem holds this checkout at the same path on every node):
#   NODES=node0,node1 launch/train_gpu_multinode.sh [--dry-run] CONFIG WORKDIR [--config.x=v ...]
#   starts the trainer on every node over ssh, node0 being the coordinator (COORDINATOR_PORT,
#   default 8476); each node logs to ~/mmsr-train.log. --dry-run prints the ssh commands.
# Under SLURM, one task per node:
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/train_gpu_multinode.sh CONFIG WORKDIR
#   every task runs the trainer directly; JAX reads the SLURM_* variables itself.
# Single node: launch/train_gpu.sh.
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 2 ]]; then
  echo "usage: NODES=host0,host1 $0 [--dry-run] CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)

if [[ -z ${NODES:-} ]]; then
  if [[ -n ${SLURM_PROCID:-} ]]; then
    cd "$repo"
    exec python3 -m mmsr_jax.train --config="$config" --workdir="$workdir" "$@"
  fi
  echo "error: set NODES=host0,host1,... (or run under srun)" >&2
  exit 2
fi

IFS=, read -r -a nodes <<<"$NODES"
port=${COORDINATOR_PORT:-8476}
extra=""
for a in "$@"; do
  extra+=" $(printf '%q' "$a")"
done
for i in "${!nodes[@]}"; do
  node=${nodes[$i]}
  remote="cd $(printf '%q' "$repo") && MMSR_COORDINATOR=${nodes[0]}:$port MMSR_NUM_PROCESSES=${#nodes[@]} MMSR_PROCESS_ID=$i setsid nohup python3 -m mmsr_jax.train --config=$config --workdir=$workdir$extra > ~/mmsr-train.log 2>&1 < /dev/null &"
  if [[ $dry_run == 1 ]]; then
    printf "ssh %s '%s'\n" "$node" "${remote//\'/\'\\\'\'}"
  else
    # shellcheck disable=SC2029  # the command is built here on purpose
    ssh "$node" "$remote"
  fi
done
