"""Multi-host start-up: ``jax.distributed.initialize`` from flags or the environment.

Explicit flags win; otherwise a Cloud TPU pod slice or a SLURM job with several tasks is detected
and JAX's own cluster auto-detection fills in the coordinator, process count and id.
"""

from __future__ import annotations

import os

import jax

MODES = ("auto", "explicit", "none")


def detected_cluster() -> str | None:
  """'slurm' or 'tpu' when the environment describes a multi-process job, else None."""
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_NPROCS", "1"))) > 1:
    return "slurm"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or os.environ.get("CLOUD_TPU_TASK_ID") is not None:
    return "tpu"
  return None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               peer_timeout: int = 60) -> str:
  """Starts multi-process JAX if asked or detected; returns what was done. ``peer_timeout``:
  seconds without a heartbeat after which a process counts as dead and the others stop
  (JAX's coordination service ends them with a message instead of leaving them waiting in a
  collective)."""
  if peer_timeout < 1:
    raise ValueError(f"--peer_timeout must be at least 1 second, got {peer_timeout}")
  if mode not in MODES:
    raise ValueError(f"--distributed {mode!r} is not one of {MODES}")
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if mode == "explicit" or explicit:
    missing = [n for n, v in (("--coordinator_address", coordinator_address),
                              ("--num_processes", num_processes), ("--process_id", process_id)) if v is None]
    if missing:
      raise ValueError(f"explicit multi-process start needs {', '.join(missing)} as well")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               heartbeat_timeout_seconds=peer_timeout)
    return f"explicit: process {process_id} of {num_processes} via {coordinator_address}"
  if mode == "none":
    return "single process"
  cluster = detected_cluster()
  if cluster is None:
    return "single process"
  jax.distributed.initialize(heartbeat_timeout_seconds=peer_timeout)
  return f"{cluster}: process {jax.process_index()} of {jax.process_count()}"
