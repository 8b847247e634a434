"""One orbax checkpoint per step that serves every rank.

Each step directory holds three items, committed together (orbax writes to a temporary
directory and renames it only when every item is written, so a crash never leaves a step that
looks complete):
  params    the model's parameters (all factors at full R) — all that evaluation restores;
  train     the learned log-variances, the optimizer state and its step counter;
  metadata  JSON: config, NSN layers and their R, trained / held-out ranks, parameter shapes,
            library version, and a fingerprint of every saved array ("checksums").

A committed step can still rot afterwards (a bad disk, a truncated copy). orbax's own format
does not always notice: bytes flipped inside a compressed chunk often read back as wrong values
without an error, so restore recomputes each array's fingerprint and compares. A step that
fails to read is skipped for the previous one; a writable manager (the trainer, holding the
workdir lock) also moves it aside to `<parent>/quarantine/<step>` so that the step number can be
saved again. Nothing is ever deleted.
"""

from __future__ import annotations

from collections.abc import Callable
import datetime
import itertools
import logging
import os
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nsn_jax.sharding import path_string

ITEMS = ("params", "train", "metadata")
QUARANTINE = "quarantine"  # sibling of the checkpoint directory that unreadable steps move to

# Odd seeds for the two position hashes (golden ratio, murmur3): independent weight streams.
_SEEDS = (np.uint32(0x9E3779B9), np.uint32(0x85EBCA6B))
_BARRIERS = itertools.count()  # unique, identical on every host: one per quarantine


class CheckpointError(RuntimeError):
  """A checkpoint that cannot serve the request: wrong model, or every step unreadable."""


class ChecksumError(ValueError):
  """A step whose arrays read back with other values than were saved."""


def abstract_tree(tree: Any, shardings: Any | None = None) -> Any:
  """The tree with arrays replaced by ShapeDtypeStructs: a restore target.

  Each leaf keeps its own sharding, or takes the matching one from `shardings` (a tree of the
  same structure) to restore into another layout.
  """
  if shardings is None:
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{"hidden/0/a": [784, 64], ...} for a params tree: what metadata records for shape checks."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_string(path): list(x.shape) for path, x in flat}


# ----- Fingerprints: computed on device, the same for any sharding of the array. -----


def _as_uint32(x: jax.Array) -> jax.Array:
  """x's elements as uint32 bit patterns (same shape; 64-bit dtypes gain a trailing (lo, hi)
  axis). Narrow integers and bools convert by value, other narrow dtypes by their bits."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([x.real, x.imag], axis=-1)
  bits = 8 * x.dtype.itemsize
  if x.dtype == jnp.bool_ or (jnp.issubdtype(x.dtype, jnp.integer) and bits < 16):
    return x.astype(jnp.uint32)  # bool / int8 / uint8 / int4: the value is the pattern
  if bits >= 32:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser: a bijection that spreads every input bit over the word."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _fingerprint(x: Any) -> jax.Array:
  """uint32[2]: Σ bits(x[i]) · w(i) mod 2³² for two position hashes w.

  Each weight is odd, so changing any single element always changes both sums; weights depend
  on the position, so swapped elements change them too. Modular sums do not depend on the order
  of addition, hence not on how the array is sharded. Positions come from iotas over the global
  shape, so no reshape (and no resharding) is needed.
  """
  u = _as_uint32(jnp.asarray(x))
  index = jnp.zeros(u.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(u.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, u.shape, axis) * np.uint32(stride % 2**32)
    stride *= u.shape[axis]
  return jnp.stack(
    [jnp.sum(u * (_mix(index ^ seed) | np.uint32(1)), dtype=jnp.uint32) for seed in _SEEDS]
  )


# One program per distinct (shape, dtype, sharding), not one over the whole tree: tracing is
# per program, and a 30-layer model has a few distinct shapes but hundreds of arrays (tracing
# SmolLM2's 272 arrays as one program took 7 s of every restore).
_fingerprint_one = jax.jit(_fingerprint)


def fingerprints(trees: dict[str, Any]) -> dict[str, dict[str, str]]:
  """{"params": {"hidden/0/a": "16 hex digits", ...}, ...} for a dict of array trees.

  Dispatched array by array without waiting; only the 8-byte results come to the host.
  """
  sums = jax.device_get(jax.tree.map(_fingerprint_one, trees))
  return {
    name: {
      path_string(path): "".join(f"{int(v):08x}" for v in leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    for name, tree in sums.items()
  }


# ----- The manager. -----


class Checkpoints:
  """Save and restore composite checkpoints in `directory` (local path or gs://…).

  `writable=True` is for the one process that owns the directory (the trainer, under the
  workdir lock): it may move unreadable steps to `<parent of directory>/quarantine/`. Readers
  (evaluation, export) leave the directory as it is.
  """

  def __init__(self, directory: str, max_to_keep: int = 3, writable: bool = False):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(
        f"train.max_to_keep={max_to_keep!r} must be ≥ 1: a run keeps at least "
        "its newest checkpoint, and older ones are deleted as new ones are saved."
      )
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.writable = writable
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
      item_names=ITEMS,
    )

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: Any, train: Any | None, metadata: dict) -> None:
    """Starts an asynchronous save of step `step`; `wait()` blocks until it is committed.

    `train` None saves no training state (an exported, inference-only checkpoint). The saved
    metadata gains "checksums": each array's fingerprint, computed now (it waits for the arrays
    and fetches 8 bytes per array), committed atomically with the arrays; and the shapes
    `check_same_model` compares ("param_shapes", "train_shapes"), so a checkpoint of another
    model or training set-up is refused by name. `metadata` itself is not modified.
    """
    trees = {"params": params} if train is None else {"params": params, "train": train}
    metadata = {**metadata, "checksums": fingerprints(trees), "param_shapes": param_shapes(params)}
    if train is not None:
      metadata["train_shapes"] = param_shapes(train)
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    items["metadata"] = ocp.args.JsonSave(metadata)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore(
    self, abstract_params: Any, abstract_train: Any | None = None, step: int | None = None
  ):
    """Restores the newest readable step (or only `step`) onto the given abstract trees.

    A step that fails to read or whose arrays do not match their saved checksums is skipped
    with a warning (and moved to quarantine if writable) and the previous one is used.
    Returns (step, params, train or None, metadata), or None if the directory holds no
    checkpoint, or, if writable, no readable one. Raises CheckpointError if the checkpoint holds
    another model (parameter shapes differ, or no training state when `abstract_train` asks for
    it), if no step can be read (read-only), or if the given `step` cannot.
    """
    if step is None and not self.steps():
      return None
    targets = {"params": abstract_params}
    if abstract_train is not None:
      targets["train"] = abstract_train

    def read(step):
      metadata = self._metadata(step)
      check_same_model(metadata, abstract_params, self.directory, abstract_train)
      missing = set(targets) - set(metadata.get("checksums", targets))
      if missing:
        raise CheckpointError(
          f"step {step} of {self.directory} holds no {sorted(missing)} "
          "state (an exported, inference-only checkpoint?)."
        )
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(t) for name, t in targets.items()}
        ),
      )
      trees = {name: restored[name] for name in targets}
      self._verify(step, metadata, trees)
      return trees["params"], trees.get("train"), metadata

    found = self._readable(read, step)
    if found is None:
      return None
    step, (params, train, metadata) = found
    return step, params, train, metadata

  def metadata(self, step: int | None = None) -> dict | None:
    """The metadata of the newest readable step (or of `step`). Only the JSON is read: arrays
    are not verified. Raises CheckpointError if there is none; writable, returns None when
    steps exist but none reads."""
    found = self._readable(self._metadata, step)
    return None if found is None else found[1]

  def _metadata(self, step: int) -> dict:
    metadata = self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))[
      "metadata"
    ]
    if not isinstance(metadata, dict):
      raise ValueError(f"metadata is {type(metadata).__name__}, not a JSON object")
    return metadata

  def _verify(self, step: int, metadata: dict, trees: dict[str, Any]) -> None:
    """Raises ChecksumError if a restored array differs from the one saved. Checkpoints from
    before checksums, and arrays restored into another dtype (orbax casts), are not checked."""
    saved = metadata.get("checksums")
    if saved is None:
      return
    actual = fingerprints(trees)
    bad = [
      f"{name}/{path}"
      for name, sums in actual.items()
      for path, value in sums.items()
      if saved.get(name, {}).get(path) != value
    ]
    if bad:  # only now pay for reading orbax's array metadata
      dtypes = self._saved_dtypes(step)
      restored = {
        f"{name}/{path_string(path)}": x.dtype
        for name, tree in trees.items()
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
      }
      bad = [p for p in bad if dtypes.get(p, restored[p]) == restored[p]]
    if bad:
      raise ChecksumError(f"checksum mismatch in {len(bad)} arrays: {', '.join(bad[:5])}")

  def _saved_dtypes(self, step: int) -> dict[str, Any]:
    """{"params/hidden/0/a": dtype, ...} as saved: from orbax's metadata of restored items."""
    metadata = self.manager.item_metadata(step)
    out = {}
    for name in ("params", "train"):
      tree = getattr(metadata.get(name), "tree", None)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[f"{name}/{path_string(path)}"] = getattr(leaf, "dtype", None)
    return out

  def _readable(self, read: Callable[[int], Any], step: int | None = None):
    """(step, read(step)) for the newest step that reads, or for `step` only. Any error but
    CheckpointError marks the step unreadable: it is skipped with a warning (moved aside if
    writable). No step read: CheckpointError listing every failure, or None if writable."""
    available = self.steps()
    if step is not None and step not in available:
      raise CheckpointError(f"no step {step} in {self.directory}; available steps: {available}")
    failures = []
    for candidate in [step] if step is not None else reversed(available):
      try:
        return candidate, read(candidate)
      except CheckpointError:
        raise  # a wrong model is wrong at every step: falling back would hide it
      except Exception as e:
        failures.append(f"step {candidate}: {_reason(e)}")
        self._set_aside(candidate, _reason(e))
    listing = "\n  ".join(failures)
    if step is not None:
      raise CheckpointError(
        f"step {step} of {self.directory} is unreadable: {listing}\navailable steps: {self.steps()}"
      )
    if self.writable and failures:
      logging.warning(
        "no readable checkpoint in %s; starting from scratch (the unreadable "
        "steps are kept in %s):\n  %s",
        self.directory,
        self._quarantine_dir(),
        listing,
      )
      return None
    raise CheckpointError(f"no readable checkpoint in {self.directory}:\n  {listing}")

  def _quarantine_dir(self) -> epath.Path:
    return epath.Path(self.directory).parent / QUARANTINE

  def _set_aside(self, step: int, reason: str) -> None:
    """Warns about an unreadable step; if writable, renames it into quarantine (process 0 only;
    every process then waits for the rename and re-lists the steps, so the number is free)."""
    if not self.writable:
      logging.warning(
        "checkpoint step %d in %s is unreadable (%s); trying an older one.",
        step,
        self.directory,
        reason,
      )
      return
    if jax.process_index() == 0:
      source = epath.Path(self.directory) / str(step)  # orbax's default step name
      target = self._quarantine_dir() / str(step)
      if target.exists():  # an earlier quarantine of the same step number: keep both
        target = target.parent / f"{step}.{datetime.datetime.now():%Y%m%dT%H%M%S.%f}"
      try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
      except Exception as e:  # e.g. an object store that cannot rename folders
        raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is unreadable ({reason}) and could not "
          f"be moved aside ({_reason(e)}): move or delete {source} by hand, then re-run."
        ) from e
      logging.warning(
        "checkpoint step %d in %s is unreadable (%s); moved it to %s.",
        step,
        self.directory,
        reason,
        target,
      )
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes(f"nsn_jax_quarantine_{step}_{next(_BARRIERS)}")
    self.manager.reload()


def _reason(e: BaseException) -> str:
  """One line on why a read failed: the innermost cause, since orbax wraps tensorstore's error
  (e.g. "ZSTD_decompressStream() failed") in a message that dumps the whole store spec."""
  while e.__cause__ is not None:
    e = e.__cause__
  lines = str(e).strip().splitlines()
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


def check_same_model(
  metadata: dict, abstract_params: Any, directory: str, abstract_train: Any | None = None
) -> None:
  """Raises CheckpointError naming the first parameters (or, with `abstract_train`, training
  state arrays) whose shapes differ: a checkpoint of another model or another training set-up
  is refused, never mistaken for a corrupt one."""
  _check_shapes(metadata.get("param_shapes", {}), abstract_params, directory, "model", "parameters")
  if abstract_train is not None and "train_shapes" in metadata:
    _check_shapes(
      metadata["train_shapes"],
      abstract_train,
      directory,
      "training state (another train.trainable or optimizer?)",
      "arrays",
    )


def _check_shapes(saved: dict, abstract: Any, directory: str, what: str, unit: str) -> None:
  wanted = param_shapes(abstract)
  diffs = [
    f"{k}: checkpoint {saved.get(k)} vs now {wanted.get(k)}"
    for k in sorted(set(saved) | set(wanted))
    if saved.get(k) != wanted.get(k)
  ]
  if diffs:
    raise CheckpointError(
      f"{directory} holds a checkpoint of another {what} ({len(diffs)} {unit} differ): "
      + "; ".join(diffs[:3])
      + ". Use a fresh --workdir, or the config this checkpoint was trained with."
    )
