"""The multi-rank objective: vmap == loop, s is trained, exp(-s) -> 1/L, presets."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nsn_jax.models.mlp import NSNMLP
from nsn_jax.objective import Objective, RankWeights, multi_rank_loss

RANKS = jnp.array([8, 4, 2, 1], jnp.int32)


def _setup(seed=0):
  model = NSNMLP(6, (16, 16), 3, max_rank=8, rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(1), (32, 6))
  labels = jax.random.randint(jax.random.key(2), (32,), 0, 3)
  return model, RankWeights(8), x, labels


@pytest.mark.parametrize("name", ["anchor_only", "uniform", "uncertainty", "uncertainty_logits",
                                  "uncertainty_ortho"])
def test_vmapped_loss_equals_python_loop_over_static_ranks(name):
  model, weights, x, labels = _setup()
  weights.log_var[...] = jnp.linspace(-0.5, 0.5, 8)
  objective = Objective.named(name)
  loss, aux = multi_rank_loss(model, weights, objective, x, labels, RANKS)
  per_rank = [optax.softmax_cross_entropy_with_integer_labels(model(x, rank=int(r)), labels).mean()
              for r in RANKS]
  np.testing.assert_allclose(aux["loss"], per_rank, rtol=1e-5)
  s = weights.log_var[...][RANKS - 1]
  expected = {
      "anchor_only": per_rank[0],
      "uniform": sum(per_rank),
  }.get(name, sum(jnp.exp(-s) * jnp.array(per_rank) + s))
  if name == "uncertainty_logits":
    p_anchor = jax.nn.softmax(model(x, rank=8))
    kls = [jnp.sum(p_anchor * (jnp.log(p_anchor) - jax.nn.log_softmax(model(x, rank=int(r)))),
                   -1).mean() for r in RANKS[1:]]
    expected += objective.logits_weight * sum(kls) / 3
  if name == "uncertainty_ortho":
    assert float(loss) > float(expected)  # the penalty is positive for random factors
  else:
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_log_variances_get_gradients_and_the_optimizer_moves_them():
  model, weights, x, labels = _setup()
  both = nnx.List([model, weights])
  optimizer = nnx.Optimizer(both, optax.adam(1e-2), wrt=nnx.Param)
  loss_fn = lambda m: multi_rank_loss(m[0], m[1], Objective(), x, labels, RANKS)[0]
  grads = nnx.grad(loss_fn)(both)
  g = grads[1]["log_var"][...]
  assert np.all(np.abs(np.asarray(g)[RANKS - 1]) > 0)
  untouched = np.setdiff1d(np.arange(8), np.asarray(RANKS) - 1)
  assert np.all(np.asarray(g)[untouched] == 0)  # indexed by rank value, not by position
  optimizer.update(both, grads)
  assert not np.allclose(weights.log_var[...][RANKS - 1], 0.0)


def test_uncertainty_weights_converge_to_inverse_loss():
  """With losses held fixed, minimising Σ exp(-s)L + s over s gives exp(-s_r) = 1/L_r."""
  losses = jnp.array([0.3, 1.0, 2.5])
  s = jnp.zeros(3)
  tx = optax.adam(0.05)
  state = tx.init(s)
  grad_fn = jax.grad(lambda s: jnp.sum(jnp.exp(-s) * losses + s))
  for _ in range(2000):
    updates, state = tx.update(grad_fn(s), state)
    s = optax.apply_updates(s, updates)
  np.testing.assert_allclose(jnp.exp(-s), 1 / losses, rtol=1e-2)


def test_unknown_objective_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown objective"):
    Objective.named("focal")
  with pytest.raises(ValueError, match="weighting"):
    Objective("max")
