"""What the checkpoint loaders (GGUF, Hugging Face BERT and decoders) share: a model built as
shapes only, filled one tensor at a time from host memory straight into its layout.

Nothing is ever allocated twice: each parameter goes from the file (memory-mapped or
dequantised on the host) to the devices its `Layout` names, each device receiving only its
shard. A model larger than one device therefore loads onto a mesh that holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flax import nnx
import numpy as np

from nsn_jax.sharding import Layout, place

ParamPath = tuple  # a parameter's path in the model's graph: ("layers", 0, "mlp", "up", "kernel")


def check_unexpected(
  source: str,
  found: Iterable[str],
  expected: Iterable[str],
  model: str,
  ignored: Callable[[str], bool] = lambda name: False,
) -> None:
  """A ValueError naming the tensors of `source` that no parameter of `model` reads (ignored
  ones aside): a checkpoint of another architecture must not load half-way."""
  unexpected = sorted(name for name in set(found) - set(expected) if not ignored(name))
  if unexpected:
    raise ValueError(f"{source}: tensors {unexpected} have no place in {model}.")


def fill(
  abstract: nnx.Module,
  tensor: Callable[[ParamPath, tuple[int, ...]], np.ndarray],
  layout: Layout | None = None,
) -> nnx.Module:
  """`abstract` (built under `nnx.eval_shape`) with every parameter set from
  `tensor(path, shape)`: its values on the host in the model's layout and that shape (it raises
  ValueError naming the file and tensor when one is missing or misshapen). `layout`
  (path "layers/0/mlp/up/kernel", shape) → its sharding, None: the default device.
  """
  graphdef, state = nnx.split(abstract)
  for param_path, variable in nnx.to_flat_state(state):
    name = "/".join(map(str, param_path))
    array = np.asarray(tensor(param_path, variable.shape), variable.dtype)
    if array.shape != variable.shape:  # a loader's conversion bug, not a user's file
      raise AssertionError(f"{name}: the loader gave {array.shape}, not {variable.shape}.")
    sharding = None if layout is None else layout(name, array.shape)
    variable.set_value(place(array, sharding))
  return nnx.merge(graphdef, state)
