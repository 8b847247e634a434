"""FlexRank's mathematical core: activation-aware factors, nested rank profiles, GAR deployment.

Flax layout throughout: y = x @ kernel with kernel (d_in, d_out). The calibration and search run on
the host in float64 numpy (they are one-off and small); factors come back as float32 like
`layers.svd_factors`. FLOPs follow `nsn_jax.flops`: per input row, a multiply-add counts 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import jax.numpy as jnp
import numpy as np
import scipy.linalg

from nsn_jax import flops
from nsn_jax.sharding import to_host

# One entry of a layer's table: (rank, cost in FLOPs per row, error); errors add across layers.
Entry = tuple[int, float, float]


def _host64(x) -> np.ndarray:
  """x as float64 on the host (gathered when other processes hold parts of it)."""
  return to_host(x).astype(np.float64)


def activation_aware_factors(
  kernel, activations, max_rank: int, eps: float = 1e-6
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Factors `a: (d_in, R')`, `b: (R', d_out)` minimising E‖x(W − a_r b_r)‖² at every rank r.

  activations: (n, d_in) calibration rows. With C = XᵀX/n = S Sᵀ the error is ‖Sᵀ(W − W_r)‖_F², so
  the optimum is the truncated SVD of Sᵀ W = U Σ Vᵀ mapped back: a = S⁻ᵀ U √Σ, b = √Σ Vᵀ (the same
  √Σ split as `svd_factors`). R' = min(max_rank, d_in, d_out).
  """
  w, x = _host64(kernel), _host64(activations)
  lam, q = np.linalg.eigh(x.T @ x / x.shape[0])
  # Clipping keeps S invertible when the statistics are rank deficient (n < d_in, duplicated
  # features); directions the data never visits then get a tiny weight instead of none.
  lam = np.maximum(lam, eps * max(lam.max(), np.finfo(np.float64).tiny))
  root = np.sqrt(lam)
  u, s, vt = np.linalg.svd((root[:, None] * q.T) @ w, full_matrices=False)  # Sᵀ W, S = Q √Λ
  r = min(max_rank, *w.shape)
  half = np.sqrt(s[:r])
  a = q @ ((u[:, :r] * half) / root[:, None])  # S⁻ᵀ = Q Λ^{-1/2}
  b = half[:, None] * vt[:r]
  return jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)


def output_error(kernel, a, b, activations, rank: int) -> float:
  """Relative output error ‖X(W − a[:, :r] b[:r])‖_F / ‖X W‖_F over the calibration rows."""
  w, x = _host64(kernel), _host64(activations)
  w_r = _host64(a)[:, :rank] @ _host64(b)[:rank]
  return float(np.linalg.norm(x @ (w - w_r)) / np.linalg.norm(x @ w))


def layer_error_table(kernel, a, b, activations) -> list[Entry]:
  """[(r, cost, squared relative output error)] for r = 1..R of one layer; cost: FLOPs per row
  of the factorised form without the bias (`flops.form_flops`), which no rank changes.

  kernel (d_in, d_out), a (d_in, R), b (R, d_out), activations X (n, d_in). With Y = XW and
  P = Xa, ‖Y − P_r b_r‖² = ‖Y‖² − 2 Σ_{i≤r} ⟨(PᵀY)_i, b_i⟩ + Σ_{i,j≤r} (PᵀP)_ij (bbᵀ)_ij, so every
  rank's error comes from prefix sums of a few products: O(n·d·R + R²·d) rather than a product
  per rank (what makes the table affordable for SmolLM2's 90 layers of R = 576).
  """
  d_in, d_out = np.shape(kernel)
  x, a, b = _host64(activations), _host64(a), _host64(b)
  y, p = x @ _host64(kernel), x @ a
  total = np.sum(y * y)
  cross = np.cumsum(np.sum((p.T @ y) * b, axis=1))
  quadratic = np.diag(np.cumsum(np.cumsum((p.T @ p) * (b @ b.T), axis=0), axis=1))
  # Cancellation can leave −1e-16 at full rank: an error is never negative.
  errors = np.maximum(total - 2 * cross + quadratic, 0.0) / total
  return [
    (r, flops.form_flops("factorised", d_in, d_out, r, use_bias=False), float(errors[r - 1]))
    for r in range(1, b.shape[0] + 1)
  ]


def best_profile(
  tables: Mapping[str, Sequence[Entry]],
  budget: float,
  min_ranks: Mapping[str, int] | None = None,
  max_units: int = 1 << 16,
) -> dict[str, int]:
  """The per-layer ranks {layer: r} of least total error with total cost ≤ budget.

  A knapsack DP over cost *units*, vectorised over every capacity 0..U at once: each layer's
  cost is measured as its excess over that layer's cheapest allowed rank, in units of the
  greatest common divisor of those excesses. With integer costs (FLOPs) and a spare budget of at
  most `max_units` such units the result is exact; SmolLM2's MLP layers (every cost a multiple of
  2·(576 + 1536)) stay exact up to whole-model budgets. Beyond that the unit grows to
  spare / `max_units` and excesses round *up*: the profile stays within budget and is optimal
  for the rounded costs. Time O(layers · ranks · U), memory one int32 (U,) choice per layer.
  `min_ranks` restricts each layer to ranks ≥ its entry (used for nesting). Raises ValueError if
  the budget is below the cheapest allowed profile's cost.
  """
  min_ranks = min_ranks or {}
  options = {
    l: [row for row in table if row[0] >= min_ranks.get(l, 0)] for l, table in tables.items()
  }
  floors = {l: min(c for _, c, _ in rows) for l, rows in options.items()}
  spare = budget - sum(floors.values())
  if spare < 0:
    raise ValueError(
      f"budget {budget} is below the cheapest allowed profile's cost {sum(floors.values())}."
    )
  excess = [c - floors[l] for l, rows in options.items() for _, c, _ in rows]
  unit = math.gcd(*map(int, excess)) if all(float(c).is_integer() for c in excess) else 0
  if unit and spare // unit <= max_units:
    capacity = int(spare // unit)
  else:
    unit, capacity = (spare / max_units, max_units) if spare else (1.0, 0)
  # units[layer][j]: option j's excess cost in units (exact, or rounded up: never over budget).
  units = {
    l: [math.ceil((c - floors[l]) / unit) for _, c, _ in rows] for l, rows in options.items()
  }
  best = np.zeros(capacity + 1)  # best[u]: least error of the layers so far within u units
  choices = []
  for layer, rows in options.items():
    new, choice = np.full(capacity + 1, np.inf), np.zeros(capacity + 1, np.int32)
    for j, ((_, _, e), u) in enumerate(zip(rows, units[layer])):
      if u > capacity:
        continue
      candidate = best[: capacity + 1 - u] + e
      better = candidate < new[u:]  # strict: among equal errors the cheaper (earlier) rank stays
      new[u:][better], choice[u:][better] = candidate[better], j
    best = new
    choices.append(choice)
  profile, left = {}, capacity
  for layer, choice in reversed(list(zip(options, choices))):
    j = choice[left]
    profile[layer], left = options[layer][j][0], left - units[layer][j]
  return {layer: profile[layer] for layer in tables}


def nested_profiles(
  tables: Mapping[str, Sequence[Entry]], budgets: Sequence[float]
) -> list[dict[str, int]]:
  """One profile per budget (in the order given), each layer's rank non-decreasing in the budget.

  Budgets are solved in increasing order, each by `best_profile` but with every layer's
  rank floored at its rank in the previous profile. The previous profile fits the larger budget,
  so each step is feasible; the smallest budget gets its unconstrained optimum, later ones may
  pay a little error for nesting. Raises ValueError if a budget is below the all-rank-1 cost.
  """
  profiles, floor = {}, None
  for i in sorted(range(len(budgets)), key=lambda i: budgets[i]):
    floor = profiles[i] = best_profile(tables, budgets[i], floor)
  return [profiles[i] for i in range(len(budgets))]


def profile_cost_error(
  tables: Mapping[str, Sequence[Entry]], profile: Mapping[str, int]
) -> tuple[float, float]:
  """(total cost, total error) of a profile under the additive model."""
  rows = [next(row for row in tables[l] if row[0] == r) for l, r in profile.items()]
  return sum(c for _, c, _ in rows), sum(e for _, _, e in rows)


def gar_factors(a, b, rank: int) -> tuple[np.ndarray, jnp.ndarray, jnp.ndarray]:
  """Gauge-aligned form of x @ a[:, :r] @ b[:r]: (perm (d_in,), n (d_in − r, r), m (r, d_out)).

  With A = a[:, :r], B = b[:r] and r pivot rows `perm[:r]` of A, G = A[rows]⁻¹ makes A G the
  identity on those rows, so x A B = x[:, rows] @ m + x[:, rest] @ (n @ m) with m = A[rows] B and
  n = A[rest] G. The rows come from QR with column pivoting on Aᵀ, which keeps G well conditioned.
  """
  a_r = np.asarray(a, np.float64)[:, :rank]
  b_r = np.asarray(b, np.float64)[:rank]
  _, perm = scipy.linalg.qr(a_r.T, mode="r", pivoting=True)
  top = a_r[perm[:rank]]
  n = np.linalg.solve(top.T, a_r[perm[rank:]].T).T  # A[rest] G without forming G
  return perm, jnp.asarray(n, jnp.float32), jnp.asarray(top @ b_r, jnp.float32)


def gar_apply(x, perm, n, m):
  """x: (..., d_in) → (..., d_out) in `flops.form_flops("gar", ...)` FLOPs per row."""
  r = m.shape[0]
  x = jnp.asarray(x)[..., perm]
  # The pivot rows of A G are the identity: they add x[:, rows] instead of costing a matmul.
  return (x[..., :r] + x[..., r:] @ n) @ m
