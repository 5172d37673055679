#!/usr/bin/env bash
# Data preparation on Google Cloud Dataflow with GPU workers: the same Beam pipelines that
# python -m mmsr_jax.annotate / mmsr_jax.precompute run locally, on up to DATAFLOW_MAX_WORKERS
# machines that each hold DATAFLOW_GPUS GPUs.
#
#   launch/prepare_dataflow.sh annotate   --input=gs://B/photos --output=gs://B/ann [annotate flags]
#   launch/prepare_dataflow.sh precompute --input=gs://B/ann --output=gs://B/pre --config=... [flags]
#
# Add --dry-run to print the command instead of running it.
# Settings come from the environment:
#   DATAFLOW_PROJECT (required), DATAFLOW_REGION (us-central1), DATAFLOW_BUCKET (gs://..., required:
#   Dataflow's temporary and staging files go under it), DATAFLOW_IMAGE (required: the worker
#   container of launch/Dockerfile.dataflow, built for GPUs and pushed, see below),
#   DATAFLOW_GPU (nvidia-l4), DATAFLOW_GPUS (1), DATAFLOW_MACHINE (g2-standard-8),
#   DATAFLOW_MAX_WORKERS (100), DATAFLOW_JOB (mmsr-<command>-<time>).
# The worker container (Dataflow GPU workers need a custom one), from the repository root:
#   docker build -f launch/Dockerfile.dataflow \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg JAX_EXTRA=cuda12 \
#     -t REGION-docker.pkg.dev/PROJECT/REPO/mmsr-prepare:TAG .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/mmsr-prepare:TAG
#   DATAFLOW_IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/mmsr-prepare:TAG
# One SDK process per worker and one thread in it: each loads the models once onto the worker's
# GPU (several processes would each load them and run out of GPU memory).
# Beam reruns failed shards itself; after a cancelled job, run the same command again: it
# writes only the shards that are missing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: $0 {annotate|precompute} [--dry-run] [command flags ...]" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
what=$1
shift
case $what in
  annotate|precompute) ;;
  *) usage ;;
esac
split_dry_run "$@"

for var in DATAFLOW_PROJECT DATAFLOW_BUCKET DATAFLOW_IMAGE; do
  if [[ -z ${!var:-} ]]; then
    if [[ $var == DATAFLOW_IMAGE ]]; then
      echo "error: set DATAFLOW_IMAGE to a worker container built from launch/Dockerfile.dataflow" \
        "and pushed (the comment at the top of $0 has the docker build and push commands)" >&2
    else
      echo "error: set $var (see the comment at the top of $0)" >&2
    fi
    exit 2
  fi
done
bucket=${DATAFLOW_BUCKET%/}
gpu=${DATAFLOW_GPU:-nvidia-l4}
gpus=${DATAFLOW_GPUS:-1}
job=${DATAFLOW_JOB:-mmsr-$what-$(date -u +%Y%m%d-%H%M%S)}

cmd=(python -m "mmsr_jax.$what"
  --runner=DataflowRunner
  --project="$DATAFLOW_PROJECT"
  --region="${DATAFLOW_REGION:-us-central1}"
  --job_name="$job"
  --temp_location="$bucket/dataflow/tmp"
  --staging_location="$bucket/dataflow/staging"
  --sdk_container_image="$DATAFLOW_IMAGE"
  --sdk_location=container
  --machine_type="${DATAFLOW_MACHINE:-g2-standard-8}"
  --max_num_workers="${DATAFLOW_MAX_WORKERS:-100}"
  --dataflow_service_options="worker_accelerator=type:$gpu;count:$gpus;install-nvidia-driver"
  --experiments=no_use_multiple_sdk_containers
  --number_of_worker_harness_threads=1)
if [[ $what == annotate ]]; then
  cmd+=(--device=cuda)  # the torch annotators on the worker's GPU (JAX finds it by itself)
fi
cmd+=("${extra[@]}")

run "${cmd[@]}"
