"""Joining a multi-process JAX cluster (Cloud TPU pod slices, several GPU hosts, or localhost),
and the few cross-process checks that turn a cluster's silent hangs into errors.

Every process runs the same train.py. On Cloud TPU VMs (and SLURM / Kubernetes JobSets)
`jax.distributed.initialize()` discovers the cluster by itself (`--multihost`); elsewhere the
coordinator is named explicitly. Afterwards `jax.devices()` lists every process's devices, each
process feeds only the batch rows its own devices hold, and sharded `jax.jit` runs the
collectives.

A process that stops on an error would leave the others blocked in their next collective, so:
- `barrier(name)` waits on the coordination service's key-value store, not in a collective, and
  fails after `timeout_s` naming the processes that never arrived;
- `announce_failure(message)` (called by the CLIs) tells every process, which then stop at their
  next barrier with that message instead of waiting;
- `check_shared(directory)` refuses a workdir that not every host sees before anything is saved.
A process that dies inside a training step is noticed by JAX's own heartbeat
(`heartbeat_timeout_s`), which stops the others.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid

from etils import epath
import jax
from jax._src import distributed as jax_distributed

from nsn_jax.config import ConfigError

_PREFIX = "nsn_jax"
_POLL_S = 0.25


class ClusterError(RuntimeError):
  """Another process failed or went missing; this one stops rather than wait forever."""


@dataclasses.dataclass
class _Settings:
  timeout_s: float = 600.0  # the longest one process may wait at a barrier for the others


_SETTINGS = _Settings()


def initialize(
  multihost: bool,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  timeout_s: float = 600.0,
  heartbeat_timeout_s: int = 100,
) -> None:
  """Joins the cluster when asked to; a single-process run calls nothing.

  `timeout_s` bounds joining and every `barrier`; `heartbeat_timeout_s` is how long JAX waits
  for a silent process before stopping the others.
  """
  if timeout_s <= 0 or heartbeat_timeout_s <= 0:
    raise ValueError(
      f"cluster timeouts must be positive seconds: --cluster_timeout={timeout_s}, "
      f"--heartbeat_timeout={heartbeat_timeout_s}."
    )
  if coordinator_address is None and not multihost:
    return
  _SETTINGS.timeout_s = float(timeout_s)
  # Cross-process collectives between CPU devices need an implementation (gloo); TPU and GPU
  # devices ignore this and use ICI / NCCL.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=int(timeout_s),
    heartbeat_timeout_seconds=heartbeat_timeout_s,
  )


def in_cluster() -> bool:
  """Whether this process has joined a cluster of several processes."""
  return jax_distributed.global_state.client is not None and jax.process_count() > 1


def _client():
  return jax_distributed.global_state.client


def _processes(directory: str) -> dict[int, str]:
  """{process index: value} of the keys under `nsn_jax/<directory>/`."""
  entries = _client().key_value_dir_get(f"{_PREFIX}/{directory}/")
  return {int(key.rsplit("/", 1)[1]): value for key, value in entries}


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Returns once every process has reached `name` (used once per run per name).

  Raises ClusterError when another process announced a failure, or naming the processes that
  did not arrive within `timeout_s` (default: `initialize`'s). A no-op outside a cluster.
  """
  if not in_cluster():
    return
  me, count = jax.process_index(), jax.process_count()
  _client().key_value_set(f"{_PREFIX}/at/{name}/{me}", "1")
  timeout_s = _SETTINGS.timeout_s if timeout_s is None else timeout_s
  deadline = time.monotonic() + timeout_s
  while True:
    missing = sorted(set(range(count)) - set(_processes(f"at/{name}")))
    if not missing:  # checked first: a process that passed and then failed did arrive
      return
    failed = _processes("failed")
    if failed:
      _client().key_value_set(f"{_PREFIX}/seen/{me}", "1", allow_overwrite=True)
      pid, message = min(failed.items())
      raise ClusterError(f"process {pid} stopped: {message}")
    if time.monotonic() > deadline:
      raise ClusterError(
        f"process(es) {missing} did not reach {name!r} within {timeout_s:.0f} s (this is "
        f"process {me}); see their logs, or raise --cluster_timeout if they are only slow."
      )
    time.sleep(_POLL_S)


def announce_failure(message: str, wait_s: float | None = None) -> None:
  """Tells every process that this one stops on `message`, then waits (≤ `wait_s`, default
  the cluster timeout) until the others still running have read it at a barrier, so none is
  left waiting for this one. Process 0 hosts the coordination service, so it also waits for
  the others to leave."""
  if not in_cluster():
    return
  me, everyone = jax.process_index(), set(range(jax.process_count()))
  _client().key_value_set(f"{_PREFIX}/failed/{me}", message[:2000], allow_overwrite=True)

  def settled() -> bool:
    told = set(_processes("failed")) | set(_processes("seen"))
    return told >= everyone and (me != 0 or set(_processes("left")) >= everyone - {0})

  deadline = time.monotonic() + (_SETTINGS.timeout_s if wait_s is None else wait_s)
  while not settled() and time.monotonic() < deadline:
    time.sleep(_POLL_S)
  _client().key_value_set(f"{_PREFIX}/left/{me}", "1", allow_overwrite=True)


def check_shared(directory: str, flag: str = "--workdir") -> None:
  """Raises ConfigError (on every process) unless every process sees what process 0 writes in
  `directory`: orbax's first save would otherwise wait forever for files that never appear."""
  if not in_cluster():
    return
  me = jax.process_index()
  if me == 0:
    token = uuid.uuid4().hex
    _client().key_value_set(f"{_PREFIX}/shared_token", token)
  else:
    token = _client().blocking_key_value_get(f"{_PREFIX}/shared_token", 10_000)
  # A name of this run's own: another launch into the same workdir cannot take it away.
  marker = epath.Path(directory) / f".nsn_jax_shared-{token}"
  if me == 0:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
  barrier("shared-written")
  seen = marker.exists() and marker.read_text() == token
  _client().key_value_set(f"{_PREFIX}/shared/{me}", "1" if seen else "0")
  barrier("shared-read")
  if me == 0:
    marker.unlink(missing_ok=True)
  blind = sorted(pid for pid, value in _processes("shared").items() if value == "0")
  if blind:
    raise ConfigError(
      flag,
      directory,
      "a directory every host shares (gs://… or a shared file system)",
      f"process(es) {blind} cannot see the file process 0 wrote there",
    )


def check_same(what: str, value: str) -> None:
  """Raises ClusterError (on every process) unless every process gives the same `value`, e.g.
  a hash of its config: hosts launched with other flags or checkouts would train on wrong data."""
  if not in_cluster():
    return
  digest = hashlib.sha256(value.encode()).hexdigest()
  _client().key_value_set(f"{_PREFIX}/same/{what}/{jax.process_index()}", digest)
  barrier(f"same-{what}")
  values = _processes(f"same/{what}")
  differ = sorted(pid for pid, v in values.items() if v != values[0])
  if differ:
    raise ClusterError(
      f"process(es) {differ} run another {what} than process 0: every host must run the same "
      "command from the same checkout."
    )
