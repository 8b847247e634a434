"""Joining a multi-process JAX cluster (Cloud TPU pod slices, several GPU hosts, or localhost).

Every process runs the same train.py. On Cloud TPU VMs (and SLURM / Kubernetes JobSets)
`jax.distributed.initialize()` discovers the cluster by itself (`--multihost`); elsewhere the
coordinator is named explicitly. Afterwards `jax.devices()` lists every process's devices, each
process feeds only its own (`jax.make_array_from_process_local_data`), and sharded `jax.jit`
runs the collectives.
"""

from __future__ import annotations

import jax


def initialize(
  multihost: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins the cluster when asked to; a single-process run calls nothing."""
  if coordinator_address is None and not multihost:
    return
  # Cross-process collectives between CPU devices need an implementation (gloo); TPU and GPU
  # devices ignore this and use ICI / NCCL.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
