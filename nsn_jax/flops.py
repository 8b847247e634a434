"""Analytic forward FLOPs and active parameters, per layer and per model, and the budget solver.

Every FLOPs formula of the library lives here. Units: FLOPs *per input row* (one example of an
MLP, one token of a sequence model), counting a multiply-add as 2 FLOPs and a bias add as 1.
Every linear map in the model is counted — the NSN layers at their rank, the dense layers (e.g.
the classifier) in full, the forms of a deployed model as they run — because a budget is a
fraction of what really runs. A sequence model adds what depends on the context rather than on a
layer's rank (`context_flops`): attention scores and weighted sums, a tied output head; so its
fractions are of the whole forward pass. Activations are not counted; XLA's own count of a
compiled program adds one FLOP per activation element, and `tests/test_flops.py` checks that
analytic + activations equals XLA's count for every rank (docs/design.md).

A rank-r map d_in → d_out runs in one of three forms (`form_flops`, per row, before the bias):

  dense       x @ W                                      2·d_in·d_out
  factorised  (x @ a_r) @ b_r                            2·r·(d_in + d_out)
  gar         (x[:, rows] + x[:, rest] @ n) @ m          2·r·(d_in + d_out − r)

(GAR: FlexRank's gauge-aligned form, `flexrank.gar_factors`.) An NSN layer at a static rank runs
the factorised form. Below the break-even rank r* = d_in·d_out / (d_in + d_out) factorised is
cheaper than dense; GAR is cheaper than dense below min(d_in, d_out).

Modules that report their own cost: a module other than an NSN layer or `nnx.Linear` with a
`flops_per_row()` method (the deployed forms of `nsn_jax.deploy`, which compute it with
`form_flops`) is counted by `model_flops` as that many FLOPs per row, whatever its rank; in the
dense reference it stands for a dense `in_features → out_features` layer, with a bias unless its
`bias` is None. Such a module is a leaf of the count: it holds no NSN layer or `nnx.Linear`,
which would be counted a second time. This keeps flops.py free of imports of the modules it
measures.

"Fraction of dense" compares with the same model whose NSN layers are plain dense layers
(d_in × d_out); "fraction of max rank" compares with the NSN model at its largest rank.
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import jax

from nsn_jax.layers import NSNDense, Rank, check_static_rank, nsn_layers, resolve_rank

# Multiply-adds per row of each form of a rank-r map d_in → d_out (the table above).
_MULTIPLY_ADDS = {
  "dense": lambda d_in, d_out, r: d_in * d_out,
  "factorised": lambda d_in, d_out, r: r * (d_in + d_out),
  # (d_in − r)·r multiply-adds into r sums (the r pivot inputs are added, not multiplied),
  # then r·d_out.
  "gar": lambda d_in, d_out, r: r * (d_in + d_out - r),
}
FORMS = tuple(_MULTIPLY_ADDS)  # "dense" first: it wins ties in `cheapest_form`


def form_flops(form: str, d_in: int, d_out: int, rank: int, use_bias: bool = True) -> int:
  """Forward FLOPs per row of a rank-`rank` map d_in → d_out run as `form` (one of `FORMS`).

  Raises ValueError for an unknown form."""
  if form not in _MULTIPLY_ADDS:
    raise ValueError(f"form must be one of {FORMS}, got {form!r}.")
  return 2 * _MULTIPLY_ADDS[form](d_in, d_out, rank) + (d_out if use_bias else 0)


def cheapest_form(d_in: int, d_out: int, rank: int, forms: Sequence[str] = FORMS) -> str:
  """The form of `forms` that runs rank `rank` in the fewest FLOPs per row; the earliest on a tie.

  Over all forms: GAR never loses to factorised, and ties dense only at rank = min(d_in, d_out),
  where dense wins (no gather, one matmul). Over ("dense", "factorised"): factorised below the
  break-even rank, dense from it."""
  return min(forms, key=lambda form: form_flops(form, d_in, d_out, rank, use_bias=False))


def break_even_rank(d_in: int, d_out: int) -> float:
  """The rank at which the factorised form's 2·r·(d_in + d_out) equals dense's 2·d_in·d_out."""
  return d_in * d_out / (d_in + d_out)


def dense_flops(d_in: int, d_out: int, use_bias: bool = True) -> int:
  """Forward FLOPs per row of a dense d_in → d_out layer."""
  return form_flops("dense", d_in, d_out, min(d_in, d_out), use_bias)


def _layer_rank(layer: NSNDense, rank: Rank) -> int:
  rank = resolve_rank(rank, layer.path)
  return (
    layer.max_rank
    if rank is None
    else check_static_rank(rank, layer.max_rank, f"layer {layer.path!r}")
  )


def nsn_layer_flops(layer: NSNDense, rank: Rank = None) -> int:
  """Forward FLOPs per row of one NSN layer at `rank` (int or profile; None = R)."""
  return form_flops(
    "factorised",
    layer.in_features,
    layer.out_features,
    _layer_rank(layer, rank),
    layer.bias is not None,
  )


def _reports_own_cost(node) -> bool:
  """Whether `node` is a module that counts its own FLOPs (see the module docstring)."""
  return isinstance(node, nnx.Module) and callable(getattr(node, "flops_per_row", None))


def _rank_free_layers(model: nnx.Module):
  """The layers whose cost does not depend on a rank: plain dense layers (nnx.Linear) and the
  modules that report their own cost (a deployed model's fixed-rank forms)."""
  return [
    node
    for _, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Linear) or _reports_own_cost(node)
  ]


def _as_dense_flops(layer) -> int:
  return dense_flops(layer.in_features, layer.out_features, layer.bias is not None)


def _rank_free_flops(layer) -> int:
  return layer.flops_per_row() if _reports_own_cost(layer) else _as_dense_flops(layer)


def context_flops(model: nnx.Module, seq_len: int | None = None) -> int:
  """FLOPs per row (token) outside the linear layers that a sequence model declares through a
  `context_flops(seq_len)` method — attention scores and weighted sums over `seq_len` positions,
  a tied output head. 0 for models without one (the MLP); such a model needs `seq_len`."""
  declared = getattr(model, "context_flops", None)
  if declared is None:
    return 0
  if seq_len is None:
    raise ValueError(f"{type(model).__name__} counts attention over the context: give seq_len.")
  return declared(seq_len)


def model_flops(model: nnx.Module, rank: Rank = None, seq_len: int | None = None) -> int:
  """Forward FLOPs per row of the whole model at a global rank or per-layer profile.

  For a sequence model a row is a token and `seq_len` the context it attends over."""
  nsn = sum(nsn_layer_flops(layer, rank) for layer in nsn_layers(model).values())
  return nsn + context_flops(model, seq_len) + sum(map(_rank_free_flops, _rank_free_layers(model)))


def dense_model_flops(model: nnx.Module, seq_len: int | None = None) -> int:
  """FLOPs per row of the same model with every NSN layer (or deployed form) a dense layer."""
  return context_flops(model, seq_len) + sum(
    map(_as_dense_flops, [*nsn_layers(model).values(), *_rank_free_layers(model)])
  )


def total_params(model: nnx.Module) -> int:
  """Every parameter the model stores (all ranks' factors included)."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def active_params(model: nnx.Module, rank: Rank = None) -> int:
  """Parameters a forward pass at `rank` reads: the factors' prefixes plus everything else."""
  unused = sum(
    (layer.max_rank - _layer_rank(layer, rank)) * (layer.in_features + layer.out_features)
    for layer in nsn_layers(model).values()
  )
  return total_params(model) - unused


def max_rank(model: nnx.Module) -> int:
  """The largest rank a global rank may take: the smallest R among the model's NSN layers."""
  layers = nsn_layers(model)
  if not layers:
    raise ValueError("the model has no NSN layers.")
  return min(layer.max_rank for layer in layers.values())


def rank_for_budget(
  model: nnx.Module, budget: float, relative_to: str = "max_rank", seq_len: int | None = None
) -> int:
  """The largest global rank whose model FLOPs are ≤ budget × the reference.

  relative_to: "max_rank" (the NSN model at R) or "dense" (the model with dense layers).
  Model FLOPs grow strictly with rank, so the feasible ranks are a prefix 1..r; r is found by
  bisection. Raises ValueError if even rank 1 exceeds the budget, naming the smallest budget.
  """
  if relative_to not in ("max_rank", "dense"):
    raise ValueError(f"relative_to must be 'max_rank' or 'dense', got {relative_to!r}.")
  if not budget > 0:
    raise ValueError(f"budget must be a positive fraction, got {budget!r}.")
  cost = lambda rank: model_flops(model, rank, seq_len)
  reference = cost(None) if relative_to == "max_rank" else dense_model_flops(model, seq_len)
  limit = budget * reference
  lo, hi = 1, max_rank(model)
  if cost(lo) > limit:
    raise ValueError(
      f"budget {budget:g} of {relative_to} FLOPs is below the cost of rank 1 "
      f"({cost(1) / reference:.4f} of {relative_to})."
    )
  while lo < hi:  # invariant: rank lo fits
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if cost(mid) <= limit else (lo, mid - 1)
  return lo
