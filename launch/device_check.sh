#!/usr/bin/env bash
# The accelerator check of the research path (issue 13's figures): on one GPU, random weights,
# nothing downloaded, one JSON. Usage: launch/device_check.sh [OUTPUT.json] [--suite_*=... flags]
# It runs `python -m mmsr_jax.bench suite` on configs/dit_l.py under a hard time limit
# (DEVICE_CHECK_LIMIT_S, default 480 s, compilation included); each part's result is in the JSON
# as soon as it exists, so a part cut off by the limit loses only itself. Set
# DEVICE_CHECK_INSTALL=1 to install the CUDA build of JAX first (needs the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-device_check.json}
[[ $# -gt 0 ]] && shift
if [[ "${DEVICE_CHECK_INSTALL:-0}" == 1 ]]; then
  python3 -m pip install -q -r requirements.txt \
    "jax[cuda12]==$(python3 -c 'import jax; print(jax.__version__)')"
fi
backend=$(python3 -c 'import jax; print(jax.default_backend())')
if [[ "$backend" != gpu ]]; then
  echo "error: JAX sees no GPU (backend $backend); install jax[cuda12] (DEVICE_CHECK_INSTALL=1)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout --signal=TERM "${DEVICE_CHECK_LIMIT_S:-480}" python3 -m mmsr_jax.bench suite \
  --config=configs/dit_l.py --suite_output="$out" "$@" || status=$?
if [[ -f "$out" ]]; then
  cat "$out"
fi
exit "$status"
