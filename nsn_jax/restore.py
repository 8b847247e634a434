"""Restoring a trained model from the one checkpoint that serves every rank.

`restore_model(path)` takes what the CLIs take: a training workdir (its `checkpoints/`), a
checkpoint directory, or an export (`python -m nsn_jax.export`: an orbax checkpoint, local or
gs://, or a safetensors / Hugging Face directory with nsn_export.json). It rebuilds the model as
shapes from the checkpoint's own (validated) config and restores only the parameters.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from nsn_jax import config as config_lib
from nsn_jax import sharding
from nsn_jax.build import build_model, mismatches
from nsn_jax.checkpoint import CheckpointError, Checkpoints, abstract_tree
from nsn_jax.deploy import DeployedLayer, empty_like
from nsn_jax.llm.hf_decoder import load_hf_decoder
from nsn_jax.llm.safetensors_io import SafetensorsFiles
from nsn_jax.metrics import say

EXPORT_FILE = "nsn_export.json"  # the metadata of an export written as files (not orbax)


class Restored(NamedTuple):
  """A restored model, its checkpoint's metadata and step."""

  model: nnx.Module
  metadata: dict[str, Any]
  step: int

  @property
  def config(self) -> ml_collections.ConfigDict:
    """The config the checkpoint was trained with, on top of today's defaults."""
    return config_lib.from_json(self.metadata["config"])


def checkpoint_directory(path: str) -> str:
  """`path/checkpoints` for a workdir, else `path` itself when it holds checkpoint steps.

  Raises CheckpointError naming the path when neither holds a checkpoint."""
  root = epath.Path(path)
  for candidate in (root / "checkpoints", root):
    if candidate.is_dir() and any(p.name.isdigit() for p in candidate.iterdir()):
      return str(candidate)
  raise CheckpointError(
    f"no checkpoint in {path}: give a train.py --workdir, its checkpoints/ "
    "folder or an export's --out (train first: python train.py "
    f"--config=... --workdir={path})."
  )


def restore_model(
  path: str, mesh: jax.sharding.Mesh | None = None, step: int | None = None
) -> Restored:
  """The model of `path`'s newest readable checkpoint (or of `step`).

  The model is rebuilt as shapes from the metadata's config (and, for an export, the deployed
  form of each layer, `nsn_jax.deploy`); only its parameters are read. With `mesh` they are
  restored straight into the layout the config's sharding rules give on it, whatever mesh wrote
  them; without, onto this process's first device. Raises CheckpointError (no or unreadable
  checkpoint, another model) or ConfigError (a config that no longer validates).
  """
  if (epath.Path(path) / EXPORT_FILE).exists():
    return _restore_file_export(epath.Path(path), mesh)
  checkpoints = Checkpoints(checkpoint_directory(path))
  try:
    metadata = checkpoints.metadata(step)
    model, state, layout = _target(metadata, mesh)
    shapes = nnx.to_pure_dict(state)
    step, params, _, metadata = checkpoints.restore(abstract_tree(shapes, layout), step=step)
  finally:
    checkpoints.close()
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return Restored(model, metadata, step)


def _target(metadata: dict, mesh: jax.sharding.Mesh | None):
  """(abstract model, its state, the layout each parameter is restored in) of a checkpoint's
  metadata: the config's model, with an export's deployed forms."""
  config = config_lib.from_json(metadata["config"])
  config_lib.validate(config, restoring=True)
  deployed = [DeployedLayer(**entry) for entry in metadata.get("deployed", [])]
  model = nnx.eval_shape(
    lambda: empty_like(build_model(config, seed=config.seed, pretrained=False), deployed)
  )
  state = nnx.state(model)
  shapes = nnx.to_pure_dict(state)
  if mesh is None:  # not the writer's layout: that mesh may not exist here
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return model, state, jax.tree.map(lambda _: one_device, shapes)
  return model, state, sharding.config_shardings(shapes, mesh, config.sharding)


def _restore_file_export(path: epath.Path, mesh: jax.sharding.Mesh | None) -> Restored:
  """A safetensors or Hugging Face export (`nsn_jax.export --format`), read whole."""
  metadata = json.loads((path / EXPORT_FILE).read_text())
  if metadata.get("layout") == "hf":
    config = config_lib.from_json(metadata["config"])
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}[config.model.dtype]
    # With a mesh: straight into the config's layout there, as for a checkpoint.
    layout = None if mesh is None else sharding.config_layout(mesh, config.sharding)
    model = load_hf_decoder(path, dtype, layout)[1]
    return Restored(model, metadata, metadata["step"])
  model, state, layout = _target(metadata, mesh)
  files = SafetensorsFiles(path)
  available = set(files.names())
  for key, variable in nnx.to_flat_state(state):
    name = "/".join(map(str, key))
    is_key = jax.dtypes.issubdtype(variable.dtype, jax.dtypes.prng_key)  # stored as key data
    if name not in available or (not is_key and files.shape(name) != variable.shape):
      raise CheckpointError(f"{path}: tensor {name!r} {variable.shape} is missing or misshapen.")
    value = files.read(name, None if is_key else variable.dtype)
    value = jax.random.wrap_key_data(value) if is_key else value
    variable.set_value(jax.device_put(value, _leaf(layout, key)))
  nnx.update(model, state)
  return Restored(model, metadata, metadata["step"])


def _leaf(tree: dict, key: tuple):
  for part in key:
    tree = tree[part]
  return tree


def restore_dense_twin(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> nnx.Module | None:
  """The dense model of the run in `model.init_from` (a twin fine-tuned on the same task with
  model.dense=True), which surgery then starts from instead of the pretrained file and a new
  head; None when unset. With `mesh` it is restored straight into its layout there. Raises
  ConfigError if that run is not such a twin."""
  workdir = config.model.init_from
  if not workdir:
    return None
  restored = restore_model(workdir, mesh)
  source = restored.config
  if not source.model.dense:
    raise config_lib.ConfigError(
      "model.init_from",
      workdir,
      "the workdir of a dense twin (model.dense=True)",
      "it holds a nested run",
    )
  differ = mismatches(config, source)
  if config.model.dtype != source.model.dtype:
    differ.append("model.dtype")  # the twin's layers compute in its own dtype
  if differ:
    raise config_lib.ConfigError(
      "model.init_from",
      workdir,
      "a run of the same model on the same task",
      f"it was trained with another {', '.join(differ)}",
    )
  say(f"starting from the dense run {workdir} at step {restored.step}")
  return restored.model
