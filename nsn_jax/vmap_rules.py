"""How NSN layers behave inside the multi-rank step's vmap over ranks.

- `is_vmapped(x)`: whether x is batched by an enclosing `jax.vmap` while it is traced, so a layer
  can tell an input that depends on the rank from one every rank shares (`rank_sharing`).
- `rank_matmul(x, w)`: x @ w with the same values and gradients, whose weight gradient XLA:CPU
  runs without copies. Under `jax.vmap` autodiff's weight gradient is one dot contracting two axes
  (ranks and rows), which XLA:CPU lowers by first transposing the activations in memory: 1.6×
  one bucket's step time on the demo MLP (docs/benchmarks.md).
"""

from __future__ import annotations

import jax
from jax.custom_batching import custom_vmap
import jax.numpy as jnp

# A custom_vmap marker's rule runs at once for an argument batched by an enclosing vmap, and not
# at all for an unbatched one. Inside a scan or remat body under the vmap nothing is batched yet,
# so a traced rank reads as unbatched there (tests/test_rank_sharing.py pins this down).
_batched_calls: list[bool] = []


@custom_vmap
def _mark(x: jax.Array) -> jax.Array:
  return x


@_mark.def_vmap
def _mark_vmap(axis_size, in_batched, x):
  del axis_size
  _batched_calls.append(bool(in_batched[0]))
  return x, in_batched[0]


def is_vmapped(x: jax.Array) -> bool:
  """True when `x` is batched by an enclosing `jax.vmap` now, at trace time."""
  _batched_calls.clear()
  _mark(jax.lax.stop_gradient(x))  # unused, so traced away; stop_gradient keeps autodiff out
  return any(_batched_calls)


@jax.custom_vjp
def rank_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x @ w, x: (..., d_in), w: (d_in, d_out), for the traced-rank paths, which run vmapped.
  Reverse-mode autodiff only, like any custom_vjp."""
  return x @ w


def _rank_matmul_forward(x, w):
  return x @ w, (x, w)


def _rank_matmul_backward(residuals, g):
  x, w = residuals
  return (g @ w.T).astype(x.dtype), weight_gradient(x, g).astype(w.dtype)


rank_matmul.defvjp(_rank_matmul_forward, _rank_matmul_backward)


@custom_vmap
def weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
  """xᵀ g over every leading axis: x (..., d_in), g (..., d_out) → (d_in, d_out)."""
  return _contract_rows(_flat(x), _flat(g), "", "")


@weight_gradient.def_vmap
def _weight_gradient_vmap(axis_size, in_batched, x, g):
  """Each vmapped element's xᵀ g, (axis_size, d_in, d_out), as one batched dot whose rows
  contract in place (vmap's own rule contracts elements and rows together, which XLA:CPU does
  by transposing the activations in memory first)."""
  del axis_size
  rows = lambda v, batched: v.reshape(v.shape[0], -1, v.shape[-1]) if batched else _flat(v)
  x_axes, g_axes = ("k" if batched else "" for batched in in_batched)
  return _contract_rows(rows(x, in_batched[0]), rows(g, in_batched[1]), x_axes, g_axes), True


def _flat(v: jax.Array) -> jax.Array:
  """(..., d) → (n, d): every leading axis as rows (a bitcast for a row-major array)."""
  return v.reshape(-1, v.shape[-1])


def _contract_rows(x: jax.Array, g: jax.Array, x_axes: str, g_axes: str) -> jax.Array:
  """xᵀ g over the rows n: x ({k}, n, d_in), g ({k}, n, d_out) → ({k}, d_in, d_out), with k
  where either is batched (`x_axes`, `g_axes`: "k" or ""); the narrower side is the dot's rows.

  XLA:CPU runs a rows-contracting dot whose output has few rows far faster than its transpose:
  (gᵀ x)ᵀ takes 0.08 ms where xᵀ g takes 1.0 ms at n = 4096, d_in = 256, d_out = 8 (and 5.4 vs
  41 ms at n = 8192, d_in = 2048, d_out = 32; one core). XLA folds a plain transpose back into
  the dot, so a barrier keeps the product as computed; the transpose is weight-sized.
  """
  out = "k" if x_axes or g_axes else ""
  if g.shape[-1] < x.shape[-1]:
    product = jnp.einsum(f"{g_axes}ne,{x_axes}nd->{out}ed", g, x)
    return jnp.swapaxes(jax.lax.optimization_barrier(product), -1, -2)
  return jnp.einsum(f"{x_axes}nd,{g_axes}ne->{out}de", x, g)
