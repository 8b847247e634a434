"""Meshes from config and sharding rules as data.

The mesh has three named axes:
  data    pure data parallelism: batch split, parameters replicated;
  fsdp    fully sharded data parallelism: batch split *and* parameter feature axes split;
  tensor  tensor parallelism: parameter feature axes split, batch replicated.
A rule maps a regular expression on a parameter's path ("layers/0/mlp/up/b") to a spec: per array
dimension None, a mesh axis, or a tuple of axes that split that dimension together (major axis
first). The first matching rule wins; unmatched leaves, and leaves smaller than
`sharding.min_size` elements, are replicated. A rule whose axes do not divide a dimension is a
ConfigError naming the parameter: silently replicating it could leave a model that does not fit.

The defaults (`DEFAULT_RULES`) shard every large parameter under fsdp, tensor or both, in the
Megatron pattern: dense column-parallel projections (q, k, v, gate, up, and any other) split
their output features over tensor; row-parallel ones (attention o, MLP down) split their input
features over tensor; embedding tables are split over the vocabulary (tensor). An NSN layer
splits both factors over tensor (a on its inputs, b on its outputs), whichever side of the block
it is on. Everything large is also split over fsdp. NSN factors
are sharded on their feature axes, never on the rank axis: a prefix a[:, :r] of a rank-sharded
array is uneven across devices and forces resharding every call. Tensor parallelism keeps
attention heads whole when `mesh.tensor` divides the number of (key/value) heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import math
import re
from typing import Any

import jax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from nsn_jax.config import MESH_AXES, ConfigError

AXES = MESH_AXES
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both
TP_FSDP = ("tensor", "fsdp")  # one dimension split over both, tensor-major (Megatron blocks)
MIN_SIZE = 1024  # elements: smaller leaves (norm scales, biases, small heads) stay replicated

# (path regex, spec). Paths end with the parameter name; optimizer moments share the same path
# suffixes, so one rule set covers parameters and optimizer state.
DEFAULT_RULES = (
  # Classifier heads: few classes, so their outputs are never split.
  (r"(^|/)head/kernel$", ("fsdp", None)),
  (r"(^|/)head/bias$", (None,)),
  # Embedding tables (vocab, dim): vocabulary-parallel, so a tied LM head gives vocab-split
  # logits. The feature axis stays whole: a lookup split on it would have to be turned into a
  # batch split, which XLA can only do by gathering everything.
  (r"(^|/)embedding$", (TP_FSDP, None)),
  # NSN factors of any projection: a (d_in, R) split on its input features, b (R, d_out) on its
  # outputs. The rank-R activation between them is all-reduced over tensor, cheap as R < d.
  (r"(^|/)a$", (TP_FSDP, None)),
  (r"(^|/)b$", (None, TP_FSDP)),
  # Dense row-parallel (attention output, MLP down): input features over tensor.
  (r"(^|/)(o|down)/kernel$", ("tensor", "fsdp")),
  (r"(^|/)(o|down)/bias$", (None,)),
  # Dense column-parallel (q, k, v, gate, up, lm_head, anything else): outputs over tensor.
  (r"(^|/)kernel$", ("fsdp", "tensor")),
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


def spec_for(
  path: str, shape: tuple[int, ...], mesh: Mesh, rules=DEFAULT_RULES, min_size: int = MIN_SIZE
) -> P:
  """The PartitionSpec of the leaf at `path`: the first matching rule with one entry per
  dimension; P() for leaves under `min_size` elements and unmatched ones. Raises ConfigError
  when the rule's axes do not divide a dimension."""
  if math.prod(shape) < min_size:
    return P()
  for pattern, spec in rules:
    if not re.search(pattern, path) or len(spec) != len(shape):
      continue  # another parameter, or a rule for another rank of array (a scalar count)
    for i, (entry, dim) in enumerate(zip(spec, shape)):
      axes = _axes(entry)
      devices = math.prod(mesh.shape[axis] for axis in axes)
      if dim % devices:
        raise ConfigError(
          "sharding.rules",
          pattern,
          "rules whose axes divide every dimension they split (or a larger sharding.min_size, "
          "to keep small parameters replicated)",
          f"{path} {tuple(shape)} gets {tuple(spec)}, and mesh axes {axes} ({devices} devices) "
          f"do not divide its dimension {i} ({dim})",
        )
    return P(*spec)
  return P()


def _axes(entry) -> tuple[str, ...]:
  """A spec entry (None, "axis" or ("axis", ...)) as a tuple of axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def tree_shardings(tree: Any, mesh: Mesh, rules=DEFAULT_RULES, min_size: int = MIN_SIZE) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: NamedSharding(
      mesh, spec_for(path_string(path), x.shape, mesh, rules, min_size)
    ),
    tree,
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's leading dimension split over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _config_rules(sharding_config: ml_collections.ConfigDict) -> tuple:
  """`config.sharding.rules` as rule tuples (the defaults when ())."""
  if not sharding_config.rules:
    return DEFAULT_RULES
  return tuple(
    (pattern, tuple(tuple(e) if isinstance(e, list) else e for e in spec))
    for pattern, spec in sharding_config.rules
  )


def config_shardings(tree: Any, mesh: Mesh, sharding_config: ml_collections.ConfigDict) -> Any:
  """`tree_shardings` under `config.sharding`: its rules (the defaults when ()) and min_size."""
  return tree_shardings(tree, mesh, _config_rules(sharding_config), sharding_config.min_size)


# (leaf path "layers/0/mlp/up/kernel", shape) → where that leaf lives. Loaders and surgery take
# one, so a model too large for one device is built straight into its layout.
Layout = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def config_layout(
  mesh: Mesh, sharding_config: ml_collections.ConfigDict, prefix: str = ""
) -> Layout:
  """The `Layout` of `config.sharding` on `mesh` for leaves that will sit at `prefix` + path in
  the train state (e.g. "model/" for a model's own parameters)."""
  rules, min_size = _config_rules(sharding_config), sharding_config.min_size
  return lambda path, shape: NamedSharding(
    mesh, spec_for(prefix + path, tuple(shape), mesh, rules, min_size)
  )


def place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """A host array as a jax.Array laid out by `sharding` (None: the default device). Each device
  receives only its own shard, sliced from host memory (`jax.make_array_from_callback`; on a
  cluster each process fills only its devices), so no device ever holds a whole array that its
  sharding splits."""
  if sharding is None:
    return jax.numpy.asarray(host)
  return jax.make_array_from_callback(
    host.shape, sharding, lambda index: np.ascontiguousarray(host[index])
  )


def to_host(x: Any) -> np.ndarray:
  """`x` as a numpy array on every process; an array other processes hold parts of is gathered
  first (multihost_utils.process_allgather), where np.asarray alone would fail; a replicated
  one is read from this process's copy."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes each device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`
  (NamedShardings, as `tree_shardings` gives): what must fit in one chip's memory."""

  def held(x, s: NamedSharding) -> int:
    split = math.prod(s.mesh.shape[a] for entry in s.spec for a in _axes(entry))
    return x.size * np.dtype(x.dtype).itemsize // split

  return sum(jax.tree.leaves(jax.tree.map(held, tree, shardings)))


def constrain(x: jax.Array, *spec) -> jax.Array:
  """`x` laid out by `spec` (one entry per dimension, as in a rule) over the mesh in context
  (`with_mesh`: the train step and evaluation set it), so XLA keeps activations where the
  parameters' layout wants them instead of resharding between layers. An entry naming axes the
  mesh lacks, or whose devices do not divide the dimension, is left unconstrained; outside a
  mesh (one device, eager use, generation) `x` is returned as it is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  fitted = []
  for entry, dim in zip(spec, x.shape):
    axes = tuple(a for a in _axes(entry) if a in mesh.axis_names)
    devices = math.prod(mesh.shape[a] for a in axes)
    fitted.append(axes if axes and dim % devices == 0 else P.UNCONSTRAINED)
  return jax.lax.with_sharding_constraint(x, P(*fitted))


def with_mesh(mesh: Mesh | None) -> Callable[[Callable], Callable]:
  """Decorates a function to trace under `mesh` (its abstract mesh, which jit allows), where
  `constrain` applies; None leaves the function as it is."""

  def decorate(fn: Callable) -> Callable:
    if mesh is None:
      return fn

    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return fn(*args, **kwargs)

    return traced

  return decorate
