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
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nsn_jax.layers import nsn_layers

WEIGHTINGS = ("anchor", "uniform", "uncertainty")


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
  def named(cls, name: str, logits_weight: float = 1.0, ortho_weight: float = 1e-2) -> "Objective":
    presets = {
        "anchor_only": cls("anchor"),
        "uniform": cls("uniform"),
        "uncertainty": cls("uncertainty"),
        "uncertainty_logits": cls("uncertainty", logits_weight=logits_weight),
        "uncertainty_ortho": cls("uncertainty", ortho_weight=ortho_weight),
    }
    if name not in presets:
      raise ValueError(f"unknown objective {name!r}; choose one of {sorted(presets)}.")
    return presets[name]


def per_rank_logits(model: nnx.Module, x: jax.Array, ranks: jax.Array) -> jax.Array:
  """The model at each rank, vmapped over the masked path: ranks (k,) → logits (k, B, C)."""
  return jax.vmap(lambda r: model(x, rank=r))(ranks)


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


def multi_rank_loss(model: nnx.Module, rank_weights: RankWeights, objective: Objective,
                    x: jax.Array, labels: jax.Array, ranks: jax.Array):
  """The combined loss and per-rank metrics.

  Args:
    x: (B, ...) inputs. labels: int (B,). ranks: int32 (k,), the ranks of this step.
  Returns:
    (loss scalar, aux dict: per-rank `loss` (k,), `accuracy` (k,), `log_var` (k,)).
  """
  logits = per_rank_logits(model, x, ranks)                     # (k, B, C)
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels[None]).mean(axis=1)    # (k,)
  log_var = rank_weights(ranks)                                 # (k,)
  anchor = jnp.argmax(ranks)
  if objective.weighting == "anchor":
    loss = losses[anchor]
  elif objective.weighting == "uniform":
    loss = losses.sum()
  else:
    loss = jnp.sum(jnp.exp(-log_var) * losses + log_var)
  if objective.logits_weight:
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    teacher = jax.lax.stop_gradient(log_p[anchor])
    kl = jnp.sum(jnp.exp(teacher) * (teacher - log_p), axis=-1).mean(axis=-1)   # (k,)
    others = jnp.maximum(ranks.shape[0] - 1, 1)
    loss += objective.logits_weight * kl.sum() / others  # KL of the anchor to itself is 0
  if objective.ortho_weight:
    loss += objective.ortho_weight * factor_orthogonality(model)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels[None], axis=1)
  return loss, {"loss": losses, "accuracy": accuracy, "log_var": log_var}
