"""The multi-rank objective: the task loss at k ranks, vmapped, combined by learned weights.

  L = Σ_k [ exp(−s_{r_k}) · L_{r_k} + s_{r_k} ]          (uncertainty weighting, the method)

s is a vector of learned log-variances indexed by rank *value* (s[r − 1] belongs to rank r), an
`nnx.Param` so the optimizer trains it. At the optimum exp(−s_r) = 1 / L_r, so every rank's
gradient is scale-normalised. Named variants (the paper's ablation):
  anchor_only         CE at the largest rank in the vector only;
  uniform             Σ_k L_{r_k}, no learned weights;
  uncertainty         the method above;
  uncertainty_logits  + λ · mean KL(p_anchor ‖ p_r) over the other ranks (anchor logits held fixed);
  uncertainty_ortho   + μ · residual orthogonality of the factors (see `factor_orthogonality`).
FlexRank's consolidation (`objective.name = flexrank_distill`) is not a weighting of ranks but a
distillation at one sampled profile per step: `distillation_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import rank_sharing
from nsn_jax.layers import WidthRank, nsn_layers
from nsn_jax.ranks import BucketPlan
from nsn_jax.tasks import Task

WEIGHTINGS = ("anchor", "uniform", "uncertainty")
DISTILL = "flexrank_distill"  # the objective name that selects `distillation_loss`


class LogVariance(nnx.Param):
  """Learned log-variances s_r of the per-rank losses, (R,), indexed by rank − 1."""


class RankWeights(nnx.Module):
  """Holds s, one learned log-variance per rank value 1..R, all starting at 0."""

  def __init__(self, max_rank: int):
    self.log_var = LogVariance(jnp.zeros((max_rank,), jnp.float32))

  def __call__(self, ranks: jax.Array) -> jax.Array:
    """ranks: int (k,) → s_r: float32 (k,)."""
    return self.log_var[...][ranks - 1]


@dataclasses.dataclass(frozen=True)
class Objective:
  """How per-rank losses combine. See the module docstring for the named presets."""

  weighting: str = "uncertainty"
  logits_weight: float = 0.0
  ortho_weight: float = 0.0

  def __post_init__(self):
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")

  @classmethod
  def named(cls, name: str, logits_weight: float = 1.0, ortho_weight: float = 1e-2) -> Objective:
    presets = {
      "anchor_only": cls("anchor"),
      "uniform": cls("uniform"),
      "uncertainty": cls("uncertainty"),
      "uncertainty_logits": cls("uncertainty", logits_weight=logits_weight),
      "uncertainty_ortho": cls("uncertainty", ortho_weight=ortho_weight),
    }
    if name not in presets:
      raise ValueError(
        f"unknown objective {name!r}; choose one of {sorted(presets)} "
        f"(or {DISTILL!r}, FlexRank's distillation, in train.py)."
      )
    return presets[name]


def per_rank(fn: Callable[[Any], Any], ranks: jax.Array | BucketPlan) -> Any:
  """fn(rank) at each rank, its leaves stacked on a leading axis (k, ...) in the order of the
  ranks.

  ranks: an int32 array (k,) runs the masked path at full width R vmapped over ranks (one
  program for any rank values; `train.multi_rank=vmap_masked`); a `BucketPlan` of a fixed set
  runs each bucket at its own static width, vmapped over its masked ranks, a one-rank bucket
  too (one program per plan; `bucketed`, and `loop_static` = one rank each), with the layers
  whose input every rank shares computed once for the set (`rank_sharing`).
  """
  if not isinstance(ranks, BucketPlan):
    return jax.vmap(fn)(ranks)
  with rank_sharing.sharing(ranks.ranks):
    parts = [_bucket(fn, bucket) for bucket in ranks.buckets]
  stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
  order = ranks.order()
  if order == tuple(range(len(order))):
    return stacked
  return jax.tree.map(lambda x: x[np.asarray(order)], stacked)


def _bucket(fn: Callable[[Any], Any], bucket: tuple[int, ...]) -> Any:
  """fn at a bucket's ranks (descending), (|bucket|, ...), at the static width of the first."""
  width = bucket[0]

  def at_rank(rank, shared_rows):
    with rank_sharing.in_bucket(bucket, shared_rows):
      return fn(WidthRank(width, rank))

  return jax.vmap(at_rank)(jnp.asarray(bucket, jnp.int32), rank_sharing.bucket_rows(bucket))


def per_rank_logits(
  model: nnx.Module, task: Task, batch: dict, ranks: jax.Array | BucketPlan
) -> jax.Array:
  """The task's logits at each rank → (k, B, ..., C), in the order of the ranks (`per_rank`)."""
  return per_rank(lambda rank: task.logits(model, batch, rank), ranks)


def factor_orthogonality(model: nnx.Module) -> jax.Array:
  """Mean squared off-diagonal cosine between rank components, summed over NSN layers.

  For each layer, the columns of `a` and the rows of `b` are normalised and their Gram matrices
  G_a, G_b (R × R) formed; the penalty is mean((G − I)²) over both. 0 = mutually orthogonal.
  """
  total = jnp.zeros((), jnp.float32)
  for layer in nsn_layers(model).values():
    for factor in (layer.a[...], layer.b[...].T):  # both as (features, R)
      unit = factor / (jnp.linalg.norm(factor, axis=0, keepdims=True) + 1e-8)
      gram = unit.T @ unit
      total += jnp.mean((gram - jnp.eye(gram.shape[0])) ** 2)
  return total


def weighted_kl(teacher_log_p: jax.Array, log_p: jax.Array, weights: jax.Array) -> jax.Array:
  """KL(p_teacher ‖ p) in nats, averaged over examples (or tokens) with `weights` (B, ...).

  teacher_log_p: (B, ..., C) log-probabilities; log_p: (k..., B, ..., C), any leading axes (e.g.
  ranks) broadcast against the teacher → (k...).
  """
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - log_p), axis=-1)  # (k..., B, ...)
  example_axes = tuple(range(kl.ndim - weights.ndim, kl.ndim))
  return jnp.sum(kl * weights, axis=example_axes) / jnp.sum(weights)


def distillation_loss(model: nnx.Module, teacher: nnx.Module, task: Task, batch: dict, profile):
  """FlexRank's consolidation loss: KL(teacher ‖ model at `profile`) on the task's logits.

  The teacher (the dense model before surgery) runs in the same program, outside the gradient.
  Returns (KL scalar, aux: `kl`, and the student's `loss` (mean CE) and `accuracy`, scalars).
  """
  logits = task.logits(model, batch, profile).astype(jnp.float32)
  teacher_log_p = jax.lax.stop_gradient(
    jax.nn.log_softmax(task.logits(teacher, batch, None).astype(jnp.float32))
  )
  kl = weighted_kl(teacher_log_p, jax.nn.log_softmax(logits), task.targets(batch)[1])
  scores = task.scores(logits, batch)
  return kl, {
    "kl": kl,
    "loss": scores["loss"] / scores["weight"],
    "accuracy": scores["correct"] / scores["weight"],
  }


def multi_rank_loss(
  model: nnx.Module, rank_weights: RankWeights, objective: Objective, task: Task, batch: dict, ranks
):
  """The combined loss and per-rank metrics.

  Args:
    batch: the arrays `task` reads. ranks: the ranks of this step, int32 (k,) or the
      `BucketPlan` of a fixed set (see `per_rank`); the objective is the same for both.
  Returns:
    (loss scalar, aux dict: per-rank `loss` (k,) (mean CE over scored examples or tokens),
    `accuracy` (k,), `log_var` (k,)).
  """
  if objective.logits_weight:  # the KL term reads every rank's whole logits
    logits = per_rank_logits(model, task, batch, ranks)  # (k, B, ..., C)
    scores = jax.vmap(lambda l: task.scores(l, batch))(logits)
  else:  # summed per rank as they are computed (a language model's in chunks: `rank_scores`)
    scores = per_rank(lambda rank: task.rank_scores(model, batch, rank), ranks)
  losses = scores["loss"] / scores["weight"]  # (k,)
  rank_values = jnp.asarray(ranks.ranks if isinstance(ranks, BucketPlan) else ranks, jnp.int32)
  log_var = rank_weights(rank_values)  # (k,)
  anchor = jnp.argmax(rank_values)
  if objective.weighting == "anchor":
    loss = losses[anchor]
  elif objective.weighting == "uniform":
    loss = losses.sum()
  else:
    loss = jnp.sum(jnp.exp(-log_var) * losses + log_var)
  if objective.logits_weight:
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    kl = weighted_kl(jax.lax.stop_gradient(log_p[anchor]), log_p, task.targets(batch)[1])  # (k,)
    others = max(rank_values.shape[0] - 1, 1)
    loss += objective.logits_weight * kl.sum() / others  # KL of the anchor to itself is 0
  if objective.ortho_weight:
    loss += objective.ortho_weight * factor_orthogonality(model)
  accuracy = scores["correct"] / scores["weight"]
  return loss, {"loss": losses, "accuracy": accuracy, "log_var": log_var}
