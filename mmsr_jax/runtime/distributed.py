"""Joins the processes of a multi-host run (``jax.distributed.initialize``) from the MMSR_* variables,
on Cloud TPU pod slices or in SLURM jobs; nothing on one host.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

ENV_COORDINATOR = "MMSR_COORDINATOR"
ENV_NUM_PROCESSES = "MMSR_NUM_PROCESSES"
ENV_PROCESS_ID = "MMSR_PROCESS_ID"
ENV_LOCAL_DEVICES = "MMSR_LOCAL_DEVICE_IDS"


def plan(env: Mapping[str, str] | None = None) -> dict | None:
  """How to initialise for this environment: keyword arguments for
  ``jax.distributed.initialize`` (``{}`` = let JAX detect the cluster), or None (single process).

  Raises ValueError naming the variable when the explicit variables are incomplete or malformed.
  """
  env = os.environ if env is None else env
  if env.get(ENV_COORDINATOR):
    missing = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if not env.get(k)]
    if missing:
      raise ValueError(f"{ENV_COORDINATOR} is set but {', '.join(missing)} is not: a multi-"
                       "process run needs the coordinator address, the process count and this "
                       "process's id")
    kwargs = {"coordinator_address": env[ENV_COORDINATOR]}
    for key, var in (("num_processes", ENV_NUM_PROCESSES), ("process_id", ENV_PROCESS_ID)):
      try:
        kwargs[key] = int(env[var])
      except ValueError:
        raise ValueError(f"{var}={env[var]!r}: expected an integer") from None
    if not 0 <= kwargs["process_id"] < kwargs["num_processes"]:
      raise ValueError(f"{ENV_PROCESS_ID}={kwargs['process_id']} is not in "
                       f"[0, {ENV_NUM_PROCESSES}={kwargs['num_processes']})")
    if env.get(ENV_LOCAL_DEVICES):
      try:
        kwargs["local_device_ids"] = [int(i) for i in env[ENV_LOCAL_DEVICES].split(",")]
      except ValueError:
        raise ValueError(f"{ENV_LOCAL_DEVICES}={env[ENV_LOCAL_DEVICES]!r}: expected comma-"
                         "separated integers") from None
    return kwargs
  if env.get("MMSR_DISTRIBUTED", "").lower() == "auto":
    return {}  # set by launch/tpu_vm.sh: JAX finds the processes of the slice itself
  tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(tpu_hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return {}  # Cloud TPU pod slice / multi-slice: JAX reads the TPU metadata itself
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
    return {}  # SLURM: JAX reads the SLURM_* variables itself
  return None


_done = False


def initialize(env: Mapping[str, str] | None = None) -> bool:
  """Initialises the JAX distributed runtime when this run spans several processes.

  Returns True if it did (or had already). Safe to call more than once.
  """
  global _done
  if _done:
    return True
  kwargs = plan(env)
  if kwargs is None:
    return False
  if "cpu" in os.environ.get("JAX_PLATFORMS", "") or os.environ.get("JAX_PLATFORM_NAME") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  _done = True
  return True
