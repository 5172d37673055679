#!/usr/bin/env bash
# Single-node GPU training: installs the CUDA build of JAX next to the pinned requirements and
# starts (or resumes) a run. Usage: launch/train_gpu.sh CONFIG WORKDIR [--config.field=value ...]
# Example: launch/train_gpu.sh configs/dit_l.py /data/runs/dit_l --config.batch_size=64
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.field=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt "jax[cuda12]==$(python3 -c 'import jax; print(jax.__version__)')"
exec python3 -m mmsr_jax.train --config="${config}" --workdir="${workdir}" "$@"
