"""FlexRank's mathematical core: activation-aware factors, nested rank profiles, GAR deployment.

Flax layout throughout: y = x @ kernel with kernel (d_in, d_out). The calibration and search run on
the host in float64 numpy (they are one-off and small); factors come back as float32 like
`layers.svd_factors`. FLOPs follow `nsn_jax.flops`: per input row, a multiply-add counts 2.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
import scipy.linalg

# One entry of a layer's table: (rank, cost in FLOPs per row, error); errors add across layers.
Entry = tuple[int, float, float]


def activation_aware_factors(kernel, activations, max_rank: int,
                             eps: float = 1e-6) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Factors `a: (d_in, R')`, `b: (R', d_out)` minimising E‖x(W − a_r b_r)‖² at every rank r.

  activations: (n, d_in) calibration rows. With C = XᵀX/n = S Sᵀ the error is ‖Sᵀ(W − W_r)‖_F², so
  the optimum is the truncated SVD of Sᵀ W = U Σ Vᵀ mapped back: a = S⁻ᵀ U √Σ, b = √Σ Vᵀ (the same
  √Σ split as `svd_factors`). R' = min(max_rank, d_in, d_out).
  """
  w = np.asarray(kernel, np.float64)
  x = np.asarray(activations, np.float64)
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
  w, x = np.asarray(kernel, np.float64), np.asarray(activations, np.float64)
  w_r = np.asarray(a, np.float64)[:, :rank] @ np.asarray(b, np.float64)[:rank]
  return float(np.linalg.norm(x @ (w - w_r)) / np.linalg.norm(x @ w))


def layer_error_table(kernel, a, b, activations) -> list[Entry]:
  """[(r, 2·r·(d_in + d_out), squared relative output error)] for r = 1..R of one layer."""
  d_in, d_out = np.shape(kernel)
  return [(r, 2 * r * (d_in + d_out), output_error(kernel, a, b, activations, r) ** 2)
          for r in range(1, np.shape(a)[1] + 1)]


def best_profile(tables: Mapping[str, Sequence[Entry]], budget: float,
                 min_ranks: Mapping[str, int] | None = None) -> dict[str, int]:
  """The per-layer ranks {layer: r} of least total error with total cost ≤ budget (exact).

  Layer-by-layer DP over (cost, error) states, keeping only the Pareto frontier: a partial profile
  that costs more and errs no less than another can never finish better. This is exact over
  achievable costs with no discretisation, and stays small because sums of a few distinct layer
  costs repeat. `min_ranks` restricts each layer to ranks ≥ its entry (used for nesting).
  """
  min_ranks = min_ranks or {}
  cheapest = sum(min(c for r, c, _ in tables[l] if r >= min_ranks.get(l, 0)) for l in tables)
  if budget < cheapest:
    raise ValueError(f"budget {budget} is below the cheapest allowed profile's cost {cheapest}.")
  frontier = [(0.0, 0.0, ())]  # (cost, error, ranks so far)
  for layer, table in tables.items():
    options = [(r, c, e) for r, c, e in table if r >= min_ranks.get(layer, 0)]
    states = sorted((cost + c, err + e, ranks + (r,)) for cost, err, ranks in frontier
                    for r, c, e in options if cost + c <= budget)
    frontier = []
    for state in states:
      if not frontier or state[1] < frontier[-1][1]:
        frontier.append(state)
  return dict(zip(tables, frontier[-1][2]))  # the costliest Pareto state has the least error


def nested_profiles(tables: Mapping[str, Sequence[Entry]],
                    budgets: Sequence[float]) -> list[dict[str, int]]:
  """One profile per budget (in the order given), each layer's rank non-decreasing in the budget.

  Budgets are solved in increasing order, each exactly (`best_profile`) but with every layer's
  rank floored at its rank in the previous profile. The previous profile fits the larger budget,
  so each step is feasible; the smallest budget gets its unconstrained optimum, later ones may
  pay a little error for nesting. Raises ValueError if a budget is below the all-rank-1 cost.
  """
  profiles, floor = {}, None
  for i in sorted(range(len(budgets)), key=lambda i: budgets[i]):
    floor = profiles[i] = best_profile(tables, budgets[i], floor)
  return [profiles[i] for i in range(len(budgets))]


def profile_cost_error(tables: Mapping[str, Sequence[Entry]],
                       profile: Mapping[str, int]) -> tuple[float, float]:
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
  """x: (..., d_in) → (..., d_out) in 2·(d_in + d_out − r)·r FLOPs per row."""
  r = m.shape[0]
  x = jnp.asarray(x)[..., perm]
  # The pivot rows of A G are the identity: they add x[:, rows] instead of costing a matmul.
  return (x[..., :r] + x[..., r:] @ n) @ m


def gar_flops(d_in: int, d_out: int, r: int) -> int:
  """FLOPs per row of `gar_apply`: (d_in − r)·r multiply-adds into r sums, then r·d_out."""
  return 2 * (d_in + d_out - r) * r


def cheapest_form(d_in: int, d_out: int, r: int) -> str:
  """"dense", "factorised" or "gar", whichever runs rank r in the fewest FLOPs per row.

  GAR never loses to the factorised form; it ties dense only at r = min(d_in, d_out), where
  dense is preferred (no gather, one matmul).
  """
  forms = {"dense": 2 * d_in * d_out, "factorised": 2 * r * (d_in + d_out),
           "gar": gar_flops(d_in, d_out, r)}
  return min(forms, key=forms.get)  # first minimum in insertion order: dense wins ties
