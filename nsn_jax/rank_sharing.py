"""Work a fixed rank set shares: NSN layers whose input is the same at every rank.

Every rank of a multi-rank step sees the same batch, so the first NSN layers (an MLP's first
hidden layer, a decoder's first block's q/k/v and gate/up projections) get the same input x at
every rank. For such a layer the outputs at the set's ranks r_1 < ... < r_k are prefix sums of
one product:

  h = x @ a[:, :r_k],  y_{r_i} = y_{r_{i-1}} + h[:, r_{i-1}:r_i] @ b[r_{i-1}:r_i],  y_{r_0} = bias

so the layer costs one pass at the largest rank instead of one per rank (Σ r), forward and
backward (one weight-gradient dot for `a`, not k). The demo MLP's step does 24% fewer FLOPs.

`objective.per_rank` opens `sharing(ranks)` around a bucket plan and runs each bucket's vmap
inside `in_bucket`, handing it `bucket_rows` as a vmapped input. Inside, `NSNDense` asks
`shared_output` first: a layer whose input does not depend on the bucket's traced rank computes
all k outputs once (the first bucket to reach it) and every later bucket reads its rows from its
input (no gather); any other call returns None and the layer runs as usual. Layers are matched
across buckets by (layer, n-th shared call), since every bucket traces the same function. A
random draw made before such a layer (dropout) is therefore drawn once, for every rank.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
import contextlib
import contextvars
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax.vmap_rules import is_vmapped


@dataclasses.dataclass
class _Sharing:
  """The open rank set (ascending), each shared layer call's outputs at all of its ranks, and
  the bucket being traced: its ranks, the shared rows it was handed, its calls so far."""

  ranks: tuple[int, ...]
  outputs: dict[tuple[int, int], list[jax.Array]] = dataclasses.field(default_factory=dict)
  bucket: tuple[int, ...] = ()
  rows: dict[tuple[int, int], jax.Array] = dataclasses.field(default_factory=dict)
  calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def stacked(self, key: tuple[int, int], bucket: Sequence[int]) -> jax.Array:
    """The shared call `key`'s outputs at `bucket`'s ranks, (|bucket|, ..., d_out)."""
    return jnp.stack([self.outputs[key][self.ranks.index(r)] for r in bucket])


_SHARING: contextvars.ContextVar[_Sharing | None] = contextvars.ContextVar(
  "nsn_rank_sharing", default=None
)


@contextlib.contextmanager
def sharing(ranks: Sequence[int]) -> Iterator[None]:
  """Inside (at trace time), layers with a rank-independent input share one pass (see module)."""
  token = _SHARING.set(_Sharing(tuple(sorted({int(r) for r in ranks}))))
  try:
    yield
  finally:
    _SHARING.reset(token)


def bucket_rows(bucket: Sequence[int]) -> dict[tuple[int, int], jax.Array]:
  """The rows of every call shared so far at `bucket`'s ranks, {key: (|bucket|, ..., d_out)}:
  what `per_rank` vmaps into the bucket (so it reads them without a gather); {} outside."""
  state = _SHARING.get()
  return {} if state is None else {key: state.stacked(key, bucket) for key in state.outputs}


@contextlib.contextmanager
def in_bucket(bucket: Sequence[int], rows: dict[tuple[int, int], jax.Array]) -> Iterator[None]:
  """Marks the bucket being traced (inside its vmap), with its rows from `bucket_rows`."""
  state = _SHARING.get()
  if state is None:
    yield
    return
  state.bucket, state.rows = tuple(bucket), rows
  state.calls.clear()  # every bucket traces the same layers in the same order
  try:
    yield
  finally:
    state.bucket, state.rows = (), {}


def shared_output(
  layer: Any, x: jax.Array, rank: jax.Array, a: jax.Array, b: jax.Array, bias: jax.Array | None
) -> jax.Array | None:
  """The layer's output at the bucket's traced `rank`, (..., d_out), from the set's shared
  outputs; None outside a bucket of `sharing` or when `x` depends on the rank (then the layer
  runs alone).

  x: (..., d_in); a: (d_in, R); b: (R, d_out); bias: (d_out,) or None, already promoted.
  """
  state = _SHARING.get()
  if state is None or not state.bucket or not is_vmapped(rank) or is_vmapped(x):
    return None
  key = (id(layer), state.calls[id(layer)])
  state.calls[id(layer)] += 1
  if key in state.rows:
    rows = state.rows[key]
  else:  # the first bucket to reach this call computes every rank's output
    state.outputs.setdefault(key, nested_outputs(x, a, b, bias, state.ranks))
    stacked = state.stacked(key, state.bucket)
    position = np.zeros(max(state.bucket) + 1, np.int32)
    position[list(state.bucket)] = np.arange(len(state.bucket))
    rows = stacked[jnp.asarray(position)[rank]]
  if rows.shape != (*x.shape[:-1], b.shape[-1]):
    raise ValueError(
      f"NSN layer {getattr(layer, 'path', '')!r}: its rank-independent input {x.shape} gives "
      f"outputs {rows.shape} in another bucket; every bucket must trace the same layers."
    )
  return rows


def nested_outputs(
  x: jax.Array, a: jax.Array, b: jax.Array, bias: jax.Array | None, ranks: Sequence[int]
) -> list[jax.Array]:
  """y at each of `ranks` (ascending), each (..., d_out), from one pass at the largest."""
  h = x @ a[:, : ranks[-1]]
  y = 0.0 if bias is None else bias  # every rank adds a segment: each y is (..., d_out)
  outputs, start = [], 0
  for r in ranks:
    y = y + h[..., start:r] @ b[start:r]
    outputs.append(y)
    start = r
  return outputs
