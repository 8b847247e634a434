"""Compiled programs kept on disk, so a restarted server skips tracing and lowering too.

JAX's persistent compilation cache skips XLA's compile, but every program is still traced and
lowered in Python first: for SmolLM2's 21 generation programs that was 21 s of a warm restart.
This store keeps each serialized executable under a key that fixes everything the program was
built from, so a restart deserialises it (milliseconds) instead:

  the checkpoint (its real path, step and metadata: config, shapes, checksums), the served
  settings the program depends on (its
  name: kind, point, batch size, prompt bucket, context), the nsn_jax source (a hash of every
  .py file: a code change invalidates everything), and jax, jaxlib and the devices.

A file that fails to load (truncated, from another build) is compiled again and replaced;
writes go to a temporary name first, so a crash never leaves a half-written entry. Loading an
executable runs code from the file, as unpickling does: the directory must be the server's own
(the default, ~/.cache/nsn_jax/xla, is), never one others can write.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import functools
import hashlib
import json
import os
import pathlib
import pickle
import tempfile

import flax
import jax
from jax.experimental import serialize_executable
import jaxlib

from nsn_jax.serve.metrics import log_event

COUNTS = collections.Counter()  # executables loaded from and compiled into stores, this process


@functools.cache
def source_hash() -> str:
  """sha256 of nsn_jax's Python sources (paths and contents), 16 hex digits."""
  root = pathlib.Path(__file__).resolve().parents[1]
  digest = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    digest.update(str(path.relative_to(root)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()[:16]


class ExecutableStore:
  """`compile(name, lower)` → an executable, from `directory` when an equal one was stored."""

  def __init__(self, directory: str, checkpoint: str, step: int, model: str):
    """`model`: what identifies the model beyond its path and step (the checkpoint's metadata:
    its config, shapes and checksums), so a workdir retrained in place is another key."""
    devices = jax.devices()
    identity = repr(
      (
        os.path.realpath(checkpoint),
        step,
        hashlib.sha256(model.encode()).hexdigest(),
        source_hash(),
        flax.__version__,
        jax.__version__,
        jaxlib.__version__,
        jax.default_backend(),
        devices[0].device_kind,
        len(devices),
      )
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    self.directory = pathlib.Path(directory) / "executables" / key

  def compile(self, name: str, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
    path = self.directory / f"{name}.bin"
    if path.is_file():
      try:
        blob, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
        by_id = {d.id: d for d in jax.devices()}
        devices = [by_id[i] for i in device_ids]  # the devices it was compiled for, in order
        executable = serialize_executable.deserialize_and_load(
          blob, in_tree, out_tree, execution_devices=devices
        )
        COUNTS["loaded"] += 1
        return executable
      except Exception as e:
        log_event("executable_unreadable", name=name, error=f"{type(e).__name__}: {e}")
    executable = lower().compile()
    COUNTS["compiled"] += 1
    sharding = jax.tree.leaves(executable.input_shardings)[0]
    device_ids = [d.id for d in sharding._device_assignment]
    entry = (*serialize_executable.serialize(executable), device_ids)
    self._write(path, pickle.dumps(entry))
    return executable

  def _write(self, path: pathlib.Path, data: bytes) -> None:
    """Atomically: a temporary file in the same directory, renamed over `path`."""
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(data)
      os.replace(f.name, path)
    except OSError as e:  # a read-only cache still serves: this start just compiled
      log_event("executable_not_stored", name=path.name, error=f"{type(e).__name__}: {e}")

  def load_latency(self) -> dict[str, list[float]]:
    """The latency samples the last server of this key saved ({} if none or unreadable)."""
    try:
      saved = json.loads((self.directory / "latency.json").read_text())
      return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
      return {}

  def save_latency(self, samples: dict[str, list[float]]) -> None:
    self._write(self.directory / "latency.json", json.dumps(samples).encode())
