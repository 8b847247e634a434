"""One orbax checkpoint per step that serves every rank.

Each step directory holds three items, committed together (orbax writes to a temporary
directory and renames it only when every item is written, so a crash never leaves a step that
looks complete):
  params    the model's parameters (all factors at full R) — all that evaluation restores;
  train     the learned log-variances, the optimizer state and its step counter;
  metadata  JSON: config, NSN layers and their R, trained / held-out ranks, parameter shapes,
            library version.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from nsn_jax.sharding import path_string

ITEMS = ("params", "train", "metadata")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot serve the request: wrong model, or every step unreadable."""


def abstract_tree(tree: Any, shardings: Any | None = None) -> Any:
  """The tree with arrays replaced by ShapeDtypeStructs: a restore target.

  Each leaf keeps its own sharding, or takes the matching one from `shardings` (a tree of the
  same structure) to restore into another layout.
  """
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def param_shapes(params: Any) -> dict[str, list[int]]:
  """{"hidden/0/a": [784, 64], ...} for a params tree: what metadata records for shape checks."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_string(path): list(x.shape) for path, x in flat}


class Checkpoints:
  """Save and restore composite checkpoints in `directory` (local path or gs://…)."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=ITEMS)

  def steps(self) -> list[int]:
    """Committed steps, oldest first."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, params: Any, train: Any | None, metadata: dict) -> None:
    """Starts an asynchronous save of step `step`; `wait()` blocks until it is committed.

    `train` None saves no training state (an exported, inference-only checkpoint)."""
    items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(metadata)}
    if train is not None:
      items["train"] = ocp.args.StandardSave(train)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore(self, abstract_params: Any, abstract_train: Any | None = None):
    """Restores the newest readable step onto the given abstract trees.

    A step that fails to read (e.g. a file corrupted after commit) is skipped with a warning and
    the previous one is used. Returns (step, params, train or None, metadata), or None if the
    directory holds no checkpoint. Raises CheckpointError if the checkpoint holds another model
    (parameter shapes differ) or no step can be read.
    """
    if not self.steps():
      return None
    items = {"params": ocp.args.StandardRestore(abstract_params)}
    if abstract_train is not None:
      items["train"] = ocp.args.StandardRestore(abstract_train)

    def read(step):
      metadata = self._metadata(step)
      check_same_model(metadata, abstract_params, self.directory)
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      train = restored["train"] if abstract_train is not None else None
      return restored["params"], train, metadata

    step, (params, train, metadata) = self._newest_readable(read)
    return step, params, train, metadata

  def metadata(self) -> dict:
    """The metadata of the newest readable step (raises CheckpointError if there is none)."""
    return self._newest_readable(self._metadata)[1]

  def _metadata(self, step: int) -> dict:
    return self.manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]

  def _newest_readable(self, read):
    """(step, read(step)) for the newest step that reads. Any error but CheckpointError marks
    the step unreadable: it is skipped with a warning. Raises CheckpointError listing every
    failure when no step reads."""
    failures = []
    for step in reversed(self.steps()):
      try:
        return step, read(step)
      except CheckpointError:
        raise  # a wrong model is wrong at every step: falling back would hide it
      except Exception as e:  # noqa: BLE001 - any unreadable step falls back to the previous one
        failures.append(f"step {step}: {type(e).__name__}: {e}")
        logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one.",
                        step, self.directory, e)
    raise CheckpointError(f"no readable checkpoint in {self.directory}:\n  " +
                          "\n  ".join(failures))


def check_same_model(metadata: dict, abstract_params: Any, directory: str) -> None:
  """Raises CheckpointError naming the first parameters whose shapes differ."""
  saved = metadata.get("param_shapes", {})
  wanted = param_shapes(abstract_params)
  diffs = [f"{k}: checkpoint {saved.get(k)} vs model {wanted.get(k)}"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise CheckpointError(
        f"{directory} holds a checkpoint of another model ({len(diffs)} parameters differ):\n  "
        + "\n  ".join(diffs[:5]) +
        "\nUse a fresh --workdir, or the config this checkpoint was trained with.")
