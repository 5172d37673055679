#!/usr/bin/env bash
# Cloud TPU VM life cycle for mmsr-jax: one host (e.g. v4-8, v5litepod-8) or a pod slice
# (e.g. v4-32, v5p-64: several hosts, every gcloud ssh/scp goes to --worker=all).
#
#   launch/tpu_vm.sh create   # check that CONFIG fits TPU_TYPE, then create the TPU VM
#                             # (TPU_SPOT=1 for a spot VM)
#   launch/tpu_vm.sh setup    # copy this checkout (git archive of HEAD) to every worker, install
#   launch/tpu_vm.sh train [--config.field=value ...]   # start/resume training on every worker
#   launch/tpu_vm.sh logs     # follow the training log of worker 0
#   launch/tpu_vm.sh delete   # delete the TPU VM
#
# Add --dry-run to any of them to print the gcloud commands instead of running them.
# Settings come from the environment:
#   TPU_NAME (mmsr), TPU_ZONE (us-west4-a), TPU_TYPE (v5litepod-16: the slice docs/tpu.md
#   shows configs/dit_l.py fitting at its global batch of 256), TPU_PROJECT (gcloud's default),
#   TPU_RUNTIME (from TPU_TYPE: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e,
#   v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e), TPU_SPOT (0), CONFIG (configs/dit_l.py),
#   WORKDIR (gs://BUCKET/runs/NAME: checkpoints, TensorBoard, config; required for train),
#   AOT_CHECK (1: before creating the VM, compile CONFIG's train step for TPU_TYPE on this
#   machine with python -m mmsr_jax.aot and refuse a config that does not fit; needs
#   pip install -r requirements-tpu.txt here, and takes minutes for the research configs).
# Overrides given to create (--config.field=value) go to that check, as they go to train; the
# remat that docs/tpu.md's table needs for CONFIG on TPU_TYPE comes first (see below).
# Training resumes from the newest checkpoint in WORKDIR, and a preempted (spot) VM saves and
# exits cleanly on SIGTERM, so after a preemption: create, setup, train again.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 {create|setup|train|logs|delete} [--dry-run] [--config.field=value ...]" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
action=$1
shift
split_dry_run "$@"

name=${TPU_NAME:-mmsr}
zone=${TPU_ZONE:-us-west4-a}
accelerator=${TPU_TYPE:-v5litepod-16}
project=${TPU_PROJECT:-$(gcloud config get-value project 2>/dev/null || true)}
config=${CONFIG:-configs/dit_l.py}
workdir=${WORKDIR:-}
remote_dir=mmsr-jax  # relative to the login directory of every worker
case $accelerator in
  v5litepod-*|v5e-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
runtime=${TPU_RUNTIME:-$default_runtime}
# Per config and slice, from docs/tpu.md's table: remat 'dots' where the step fits with it,
# 'full' where it does not. These go before the command line's overrides (the last one wins),
# to the fit check and to training alike. The mesh needs no entry: mesh.fsdp=-1 takes the
# widest FSDP axis the model's widths divide (DiT-XL on 256 chips: data=2, fsdp=128).
case "$(basename "$config" .py):$accelerator" in
  dit_xl:v5litepod-16|dit_xl:v5e-16|dit_l:v6e-4|dit_xl:v6e-4|dit_b:v4-8|dit_l:v4-8|dit_xl:v4-8)
    extra=(--config.model.remat=full "${extra[@]}") ;;
esac
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

case $action in
  create)
    if [[ ${AOT_CHECK:-1} == 1 ]]; then
      check=(python3 -m mmsr_jax.aot --config="$config" --topology="$accelerator"
             --count_flops=model --require_fit "${extra[@]}")
      if [[ $dry_run == 1 ]]; then
        run "${check[@]}"
      elif ! (cd "$(dirname "$0")/.." && "${check[@]}" > /dev/null); then
        echo "error: not creating $name: $config does not fit $accelerator (the line above" \
          "says why; AOT_CHECK=0 skips the check)" >&2
        exit 2
      fi
    fi
    args=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
          --accelerator-type="$accelerator" --version="$runtime")
    [[ ${TPU_SPOT:-0} == 1 ]] && args+=(--spot)
    run "${args[@]}"
    ;;
  setup)
    archive=/tmp/mmsr-jax-$$.tar.gz
    run git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz -o "$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$name:mmsr-jax.tar.gz" "${where[@]}" \
      --worker=all
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
      --command="mkdir -p $remote_dir && tar -xzf mmsr-jax.tar.gz -C $remote_dir && cd $remote_dir && python3 -m pip install -q -r requirements-tpu.txt"
    ;;
  train)
    if [[ -z $workdir ]]; then
      if [[ $dry_run == 1 ]]; then
        workdir=gs://BUCKET/runs/$name
      else
        echo "error: set WORKDIR (e.g. gs://BUCKET/runs/$name) for the checkpoints" >&2
        exit 2
      fi
    fi
    train_cmd="python3 -m mmsr_jax.train --config=$config --workdir=$workdir"
    for a in "${extra[@]}"; do
      train_cmd+=" $(quote "$a")"
    done
    # Every worker starts the same command, detached from the ssh session; MMSR_DISTRIBUTED=auto
    # makes each call jax.distributed.initialize() (JAX finds the slice's hosts itself).
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all \
      --command="cd $remote_dir && MMSR_DISTRIBUTED=auto setsid nohup $train_cmd > ~/train.log 2>&1 < /dev/null &"
    ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=0 \
      --command="tail -n 200 -f ~/train.log"
    ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
