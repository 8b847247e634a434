"""The nested low-rank layer: y = (x @ a[:, :r]) @ b[:r] + bias.

One parameter set holds every rank r in [1, R]. Rank r uses the first r columns of `a` and the
first r rows of `b`, so W_r = a[:, :r] @ b[:r] and W_{r+1} - W_r is a rank-one step.

A rank reaches a layer in one of four forms (see `resolve_rank`):
- a Python int: *static*. Real slices, so under `jax.jit` each rank is its own XLA program with
  2·r·(d_in + d_out) FLOPs per row instead of 2·d_in·d_out.
- a jax integer array (traced or concrete): *masked*. The full factors with a prefix mask, so one
  compiled program serves any rank drawn at run time; this is what training vmaps over. A traced
  rank cannot be checked at trace time, so it is clamped to [1, R].
- a `WidthRank(width, rank)`: both. Static slices of `width` columns, masked to the traced `rank`
  (clamped to [1, width]) within them; a bucket of similar ranks vmaps over it at the cost of
  its widest rank (`nsn_jax.ranks.BucketPlan`), and a layer whose input every rank shares runs
  once for the whole rank set (`nsn_jax.rank_sharing`).
- a mapping from layer path to rank: a per-layer *profile* (FlexRank); each layer looks up its own
  path, set by `name_nsn_layers`.
The traced forms multiply through `vmap_rules.rank_matmul` (reverse-mode autodiff only, with a
weight gradient XLA:CPU runs without copies under vmap); static ranks use a plain matmul.

A rank reaches the layers of a whole model through a *rank scope*, not through the model's code:
inside `with at_rank(rank):` every NSNDense called without a rank of its own runs at `rank`. So
any Flax NNX model runs at any rank after `decompose_and_replace`, although it was written with
plain `nnx.Linear` and knows nothing of ranks. The scope is read while a function is traced:
set it inside the function you `jax.jit` and pass a static rank as a static argument, so each
rank gets its own compiled program (see docs/design.md, "One way for ranks to reach layers").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import contextvars
import dataclasses
import numbers
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import rank_sharing, vmap_rules


@dataclasses.dataclass(frozen=True)
class WidthRank:
  """A traced rank inside a static width: slices `a[:, :width]`, `b[:width]`, then masks the
  first `rank` (int32 scalar, clamped to [1, width]) of those components."""

  width: int
  rank: jax.Array


Rank = int | jax.Array | WidthRank | Mapping[str, Any] | None
_SCOPE: contextvars.ContextVar[Rank] = contextvars.ContextVar("nsn_rank", default=None)


@contextlib.contextmanager
def at_rank(rank: Rank) -> Iterator[None]:
  """Every NSNDense called inside (at trace time) without its own rank runs at `rank`.

  `rank=None` leaves the enclosing scope as it is (no scope at all: the max rank R), so a model
  that takes a `rank` argument can always open a scope with it.
  """
  if rank is None:
    yield
    return
  token = _SCOPE.set(rank)
  try:
    yield
  finally:
    _SCOPE.reset(token)


def current_rank() -> Rank:
  """The rank of the innermost `at_rank` scope, None outside any."""
  return _SCOPE.get()


def effective_rank(rank: Rank) -> Rank:
  """`rank`, or for None the enclosing scope's: what a program compiled now must be keyed by
  (a cache keyed by None would otherwise keep a program traced under some outer scope)."""
  return current_rank() if rank is None else rank


def apply(model: Any, *args, rank: Rank = None, **kwargs) -> Any:
  """`model(*args, **kwargs)` with every NSN layer in it at `rank` (see `at_rank`)."""
  with at_rank(rank):
    return model(*args, **kwargs)


class NSNFactor(nnx.Param):
  """A low-rank factor of an NSN layer (`a` or `b`).

  Its own Variable type so optimizers, freezing and sharding rules can select the factors.
  """


def is_static_rank(rank: Any) -> bool:
  """True for a Python/numpy integer (not bool): the rank that slices."""
  return isinstance(rank, numbers.Integral) and not isinstance(rank, bool)


def check_static_rank(rank: Any, max_rank: int, where: str = "layer") -> int:
  """Returns `rank` as an int, or raises ValueError naming R and the rank given."""
  if not is_static_rank(rank):
    raise ValueError(
      f"NSN {where} (max rank R={max_rank}) got rank {rank!r} of type {type(rank).__name__}; "
      f"a rank must be an integer in [1, {max_rank}] or a jax integer array."
    )
  if not 1 <= rank <= max_rank:
    raise ValueError(
      f"NSN {where} (max rank R={max_rank}) got rank {rank}; valid ranks are 1..{max_rank}."
    )
  return int(rank)


def resolve_rank(rank: Rank, path: str) -> Any:
  """Picks this layer's rank out of a global rank or a per-layer profile {path: rank}."""
  if isinstance(rank, Mapping):
    if path not in rank:
      raise ValueError(
        f"rank profile has no entry for NSN layer {path!r}; it names {sorted(rank)}."
      )
    return rank[path]
  return rank


def scratch_factor_init(
  key: jax.Array, d_in: int, d_out: int, max_rank: int, dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
  """From-scratch factors `a: (d_in, R)`, `b: (R, d_out)` that keep every rank well scaled.

  a ~ N(0, 1/d_in), so each component a_iᵀx has the input's variance. Row i of b has variance
  w_i with w_i = (1/i) / H_R (H_R the R-th harmonic number), so the full-rank output variance
  equals LeCun init's (Σ w_i = 1) while rank r keeps the fraction H_r / H_R of it rather than r/R.
  For R = 64, rank 1 keeps 21% and rank 8 keeps 57% of the full-rank output variance (uniform
  scales would give 1.6% and 12.5%). The decay also matches the decaying energy profile NSN learns.
  """
  key_a, key_b = jax.random.split(key)
  a = jax.random.normal(key_a, (d_in, max_rank), dtype) / np.sqrt(d_in)
  inv_i = 1.0 / np.arange(1, max_rank + 1)
  row_std = np.sqrt(inv_i / inv_i.sum()).astype(np.float32)
  b = jax.random.normal(key_b, (max_rank, d_out), dtype) * jnp.asarray(row_std, dtype)[:, None]
  return a, b


def svd_factors(kernel: jax.Array, max_rank: int) -> tuple[jax.Array, jax.Array]:
  """Thin-SVD factors of a dense kernel `(d_in, d_out)` with the √S split.

  kernel = U S Vᵀ → a = U[:, :R'] √S, b = √S Vᵀ[:R'] with R' = min(R, d_in, d_out). With this
  split component i has energy ‖a_i‖·‖b_i‖ = σ_i, and a @ b reproduces the kernel at R' = min(d).
  (Flax keeps kernels as (d_in, d_out), the transpose of W in y = W x; the split is the same.)
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  u, s, vt = jnp.linalg.svd(kernel, full_matrices=False)
  r = min(max_rank, *kernel.shape)
  root = jnp.sqrt(s[:r])
  return u[:, :r] * root, root[:, None] * vt[:r]


class NSNDense(nnx.Module):
  """A dense layer whose kernel is a nested family of rank-r factorisations.

  Attributes:
    a: NSNFactor (d_in, R). b: NSNFactor (R, d_out). bias: Param (d_out,) or None, never sliced.
    path: the layer's path in its model ("hidden/0"), set by `name_nsn_layers`; profiles use it.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    max_rank: int,
    *,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    factors: tuple[jax.Array, jax.Array] | None = None,
  ):
    if not is_static_rank(max_rank) or max_rank < 1:
      raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}.")
    if factors is None:
      if rngs is None:
        raise ValueError("NSNDense needs `rngs` (from-scratch init) or `factors` (e.g. SVD).")
      factors = scratch_factor_init(rngs.params(), in_features, out_features, max_rank)
    a, b = factors
    if a.shape != (in_features, max_rank) or b.shape != (max_rank, out_features):
      raise ValueError(
        f"factors of shapes {a.shape}, {b.shape} do not fit "
        f"d_in={in_features}, d_out={out_features}, R={max_rank}."
      )
    self.in_features, self.out_features, self.max_rank = in_features, out_features, max_rank
    self.dtype, self.param_dtype = dtype, param_dtype
    self.a = NSNFactor(jnp.asarray(a, param_dtype))
    self.b = NSNFactor(jnp.asarray(b, param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.path = ""

  @classmethod
  def from_dense(
    cls,
    kernel: jax.Array,
    bias: jax.Array | None,
    max_rank: int,
    *,
    dtype=None,
    param_dtype=jnp.float32,
  ) -> NSNDense:
    """SVD-initialised layer from a dense `kernel: (d_in, d_out)` and optional `bias: (d_out,)`.

    R is truncated to min(max_rank, d_in, d_out); the bias is copied.
    """
    return cls.from_factors(
      *svd_factors(kernel, max_rank), bias, dtype=dtype, param_dtype=param_dtype
    )

  @classmethod
  def from_factors(
    cls, a: jax.Array, b: jax.Array, bias: jax.Array | None, *, dtype=None, param_dtype=jnp.float32
  ) -> NSNDense:
    """A layer holding factors `a: (d_in, R)`, `b: (R, d_out)` and an optional `bias: (d_out,)`.

    d_in, d_out and R are read off the factors; the bias is copied.
    """
    (d_in, max_rank), d_out = a.shape, b.shape[1]
    layer = cls(
      d_in,
      d_out,
      max_rank,
      use_bias=bias is not None,
      dtype=dtype,
      param_dtype=param_dtype,
      factors=(a, b),
    )
    if bias is not None:
      layer.bias[...] = jnp.asarray(bias, param_dtype)
    return layer

  def __call__(self, x: jax.Array, rank: Rank = None) -> jax.Array:
    """x: (..., d_in) → (..., d_out) at `rank`; None: the enclosing `at_rank` scope's, else R."""
    rank = resolve_rank(current_rank() if rank is None else rank, self.path)
    a, b = self.a[...], self.b[...]
    bias = None if self.bias is None else self.bias[...]
    x, a, b, bias = nnx.nn.dtypes.promote_dtype((x, a, b, bias), dtype=self.dtype)
    width, traced = self._width_and_mask_rank(rank)
    if traced is None:
      y = (x @ a[:, :width]) @ b[:width]
    else:
      shared = rank_sharing.shared_output(self, x, traced, a, b, bias)
      if shared is not None:
        return shared
      h = vmap_rules.rank_matmul(x, a[:, :width])
      h = h * (jnp.arange(width) < jnp.clip(traced, 1, width)).astype(h.dtype)
      y = vmap_rules.rank_matmul(h, b[:width])
    return y if bias is None else y + bias

  def _width_and_mask_rank(self, rank) -> tuple[int, jax.Array | None]:
    """(static width sliced, traced rank masked within it or None) of any non-profile rank."""
    where = f"layer {self.path!r}"
    if isinstance(rank, WidthRank):
      width, traced = check_static_rank(rank.width, self.max_rank, where), rank.rank
    elif isinstance(rank, (jax.Array, np.ndarray)):
      width, traced = self.max_rank, rank
    else:
      width = self.max_rank if rank is None else check_static_rank(rank, self.max_rank, where)
      return width, None
    dtype = jnp.asarray(traced).dtype
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"NSN {where}: a rank array must be integer, got {dtype}.")
    return width, traced

  def kernel(self, rank: int | None = None) -> jax.Array:
    """The materialised kernel W_r = a[:, :r] @ b[:r], (d_in, d_out); for analysis, not forward."""
    r = self.max_rank if rank is None else check_static_rank(rank, self.max_rank)
    return self.a[...][:, :r] @ self.b[...][:r]


def nsn_layers(model: nnx.Module) -> dict[str, NSNDense]:
  """Every NSNDense in `model`, keyed by its path ("hidden/0"), in graph order."""
  return {
    "/".join(map(str, path)): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, NSNDense)
  }


def name_nsn_layers(model: nnx.Module) -> dict[str, NSNDense]:
  """Sets each NSNDense's `path` so per-layer rank profiles can address it; returns them."""
  layers = nsn_layers(model)
  for path, layer in layers.items():
    layer.path = path
  return layers


def set_submodule(model: nnx.Module, path: str | tuple, child: nnx.Module) -> None:
  """Replaces the submodule at `path` ("layers/3/mlp/up" or the key tuple of `nnx.iter_graph`)."""
  keys = [
    int(k) if isinstance(k, str) and k.isdigit() else k
    for k in (path.split("/") if isinstance(path, str) else path)
  ]
  parent = model
  for key in keys[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(keys[-1], int):
    parent[keys[-1]] = child
  else:
    setattr(parent, keys[-1], child)
