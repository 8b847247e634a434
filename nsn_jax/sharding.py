"""Meshes from config and sharding rules as data.

The mesh has three named axes:
  data    pure data parallelism: batch split, parameters replicated;
  fsdp    fully sharded data parallelism: batch split *and* parameter feature axes split;
  tensor  tensor parallelism: parameter feature axes split, batch replicated.
A rule maps a regular expression on a parameter's path ("hidden/0/a") to a PartitionSpec of mesh
axis names, one per array dimension. The first matching rule wins; unmatched leaves are
replicated. NSN factors are sharded on their feature axes, never on the rank axis: a prefix
a[:, :r] of a rank-sharded array is uneven across devices and forces resharding every call.
An axis that does not divide its dimension is dropped from that leaf's spec (replicated), so
one rule set serves every model size; `tests/test_sharding.py` pins the resulting specs.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
import re
from typing import Any

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from nsn_jax.config import MESH_AXES, ConfigError

AXES = MESH_AXES
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# (path regex, spec). Paths end with the parameter name; optimizer moments share the same path
# suffixes, so one rule set covers parameters and optimizer state.
DEFAULT_RULES = (
  (r"(^|/)a$", ("fsdp", None)),  # NSN factor a: (d_in, R) → split d_in
  (r"(^|/)b$", (None, "tensor")),  # NSN factor b: (R, d_out) → split d_out
  (r"(^|/)kernel$", ("fsdp", "tensor")),  # dense kernel (d_in, d_out)
  (r"(^|/)bias$", ("tensor",)),
)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 (= the remaining devices).

  The axis sizes must multiply to a divisor of the device count; the mesh then uses the first
  that many devices, and in a multi-process run it must hold devices of every process. Raises
  ValueError (ConfigError) otherwise, before anything is compiled.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_config[axis]) for axis in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive, with at most one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide the {len(devices)} devices.")
    sizes[sizes.index(-1)] = len(devices) // known
  total = math.prod(sizes)
  if len(devices) % total:
    raise ValueError(
      f"mesh {dict(zip(AXES, sizes))} needs {total} devices, which does not "
      f"divide the {len(devices)} devices available."
    )
  left_out = sorted({d.process_index for d in devices} - {d.process_index for d in devices[:total]})
  if left_out:
    raise ConfigError(
      "mesh",
      str(dict(zip(AXES, sizes))),
      f"sizes that multiply to all {len(devices)} devices (or one axis of -1)",
      f"it uses {total}, leaving out every device of process(es) {left_out}, and every process "
      "of a cluster must run the step",
    )
  grid = device_grid(sizes, devices[:total])
  return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def parse_mesh(spec: str, flag: str = "--mesh") -> ml_collections.ConfigDict:
  """ "data=-1" or "data=2,fsdp=1,tensor=2" → a mesh config (unnamed axes are 1)."""
  sizes = dict.fromkeys(AXES, 1)
  for part in filter(None, (p.strip() for p in spec.split(","))):
    axis, _, size = part.partition("=")
    if axis.strip() not in AXES or not size.strip().lstrip("-").isdigit():
      raise ConfigError(flag, spec, f"axis=size pairs over {', '.join(AXES)}, e.g. data=2,tensor=2")
    sizes[axis.strip()] = int(size)
  return ml_collections.ConfigDict(sizes)


def device_grid(sizes: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """`devices` laid out as a (data, fsdp, tensor) array in the accelerator's topology.

  On TPU, `mesh_utils` places neighbouring chips on the axes that talk most (tensor, then
  fsdp). Over several slices (multislice: devices carry distinct `slice_index`), the data axis
  is split across slices, so only the gradient all-reduce crosses the slower data-centre
  network (DCN) and fsdp/tensor stay on each slice's ICI. On CPU and GPU the order is the
  device order.
  """
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  if sizes[0] % slices:
    raise ConfigError(
      "mesh.data",
      sizes[0],
      f"a multiple of the {slices} slices",
      "data parallelism is the axis that crosses slices; fsdp and tensor stay within one",
    )
  per_slice = [sizes[0] // slices, *sizes[1:]]
  return mesh_utils.create_hybrid_device_mesh(
    per_slice, [slices, 1, 1], devices, allow_split_physical_axes=True
  )


def process_rows(batch: NamedSharding, batch_size: int) -> np.ndarray:
  """Positions, in a global batch of `batch_size`, of the rows this process's devices hold
  under `batch` (sorted). Usually a contiguous 1/P of the batch; when an axis the batch is
  replicated over (tensor) spans processes, several processes hold the same rows."""
  rows = np.arange(batch_size)
  held = batch.addressable_devices_indices_map((batch_size,)).values()
  return np.unique(np.concatenate([rows[index[0]] for index in held]))


def global_batch(
  batch: NamedSharding, batch_size: int, rows: np.ndarray, local: dict[str, np.ndarray]
) -> dict[str, jax.Array]:
  """Global arrays of `batch_size` rows laid out by `batch`, from this process's `local`
  arrays, whose leading axis holds the global rows `rows` (`process_rows`)."""
  where = np.full(batch_size, -1)
  where[rows] = np.arange(len(rows))

  def make(x: np.ndarray) -> jax.Array:
    shape = (batch_size, *x.shape[1:])
    return jax.make_array_from_callback(
      shape, batch, lambda index: x[(where[index[0]], *index[1:])]
    )

  return {k: make(v) for k, v in local.items()}


def path_string(path: tuple) -> str:
  """A jax key path → "hidden/0/a". Attribute hops (a Variable's `.value`) are not part of it."""
  return "/".join(
    str(getattr(k, "key", getattr(k, "idx", k)))
    for k in path
    if not isinstance(k, jax.tree_util.GetAttrKey)
  )


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES) -> P:
  """The PartitionSpec of the leaf at `path`: the first matching rule, axes that do not divide
  their dimension dropped; P() for scalars and unmatched leaves."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      if len(spec) != len(shape):
        continue  # a rule for another rank of array (e.g. a scalar optimizer count)
      fitted = [
        axis if axis is not None and dim % mesh.shape[axis] == 0 else None
        for axis, dim in zip(spec, shape)
      ]
      return P(*fitted)
  return P()


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: NamedSharding(mesh, spec_for(path_string(path), x.shape, mesh, rules)), tree
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's leading dimension split over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def rules_from_config(config: ml_collections.ConfigDict):
  """`config.sharding.rules` as ((regex, spec), ...), or the defaults when ()."""
  if not config.rules:
    return DEFAULT_RULES
  return tuple((pattern, tuple(spec)) for pattern, spec in config.rules)
