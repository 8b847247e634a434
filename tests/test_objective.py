"""The multi-rank objective: vmap == loop, s is trained, exp(-s) -> 1/L, presets."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsn_jax.models.mlp import NSNMLP
from nsn_jax.objective import Objective, RankWeights, multi_rank_loss
from nsn_jax.tasks import get_task

IMAGES = get_task("image_classification")

RANKS = jnp.array([8, 4, 2, 1], jnp.int32)


def _setup(seed=0):
  model = NSNMLP(6, (16, 16), 3, max_rank=8, rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(1), (32, 6))
  labels = jax.random.randint(jax.random.key(2), (32,), 0, 3)
  return model, RankWeights(8), x, labels


@pytest.mark.parametrize(
  "name", ["anchor_only", "uniform", "uncertainty", "uncertainty_logits", "uncertainty_ortho"]
)
def test_vmapped_loss_equals_python_loop_over_static_ranks(name):
  model, weights, x, labels = _setup()
  weights.log_var[...] = jnp.linspace(-0.5, 0.5, 8)
  objective = Objective.named(name)
  loss, aux = multi_rank_loss(
    model, weights, objective, IMAGES, {"image": x, "label": labels}, RANKS
  )
  per_rank = [
    optax.softmax_cross_entropy_with_integer_labels(model(x, rank=int(r)), labels).mean()
    for r in RANKS
  ]
  np.testing.assert_allclose(aux["loss"], per_rank, rtol=1e-5)
  s = weights.log_var[...][RANKS - 1]
  expected = {"anchor_only": per_rank[0], "uniform": sum(per_rank)}.get(
    name, sum(jnp.exp(-s) * jnp.array(per_rank) + s)
  )
  if name == "uncertainty_logits":
    p_anchor = jax.nn.softmax(model(x, rank=8))
    kls = [
      jnp.sum(p_anchor * (jnp.log(p_anchor) - jax.nn.log_softmax(model(x, rank=int(r)))), -1).mean()
      for r in RANKS[1:]
    ]
    expected += objective.logits_weight * sum(kls) / 3
  if name == "uncertainty_ortho":
    assert float(loss) > float(expected)  # the penalty is positive for random factors
  else:
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_log_variances_get_gradients_and_the_optimizer_moves_them():
  model, weights, x, labels = _setup()
  both = nnx.List([model, weights])
  optimizer = nnx.Optimizer(both, optax.adam(1e-2), wrt=nnx.Param)
  loss_fn = lambda m: multi_rank_loss(
    m[0], m[1], Objective(), IMAGES, {"image": x, "label": labels}, RANKS
  )[0]
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


def test_loop_of_static_ranks_equals_the_vmapped_masked_step():
  """train.multi_rank=loop_static: a tuple of ranks gives the same loss and gradients."""
  model, weights, x, labels = _setup(3)
  batch = {"image": x, "label": labels}
  grad = lambda ranks: nnx.value_and_grad(
    lambda m: multi_rank_loss(
      m[0], m[1], Objective.named("uncertainty_logits"), IMAGES, batch, ranks
    )[0]
  )((model, weights))
  (masked, masked_grads), (static, static_grads) = grad(RANKS), grad((8, 4, 2, 1))
  np.testing.assert_allclose(static, masked, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(static_grads), jax.tree.leaves(masked_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_language_modelling_scores_only_real_next_tokens():
  """Padding (mask False) is never a target: changing padded tokens changes nothing."""
  from nsn_jax.models.llama import LlamaConfig, LlamaModel
  from nsn_jax.surgery import decompose_and_replace

  config = LlamaConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24)
  model = decompose_and_replace(LlamaModel(config, rngs=nnx.Rngs(0)), max_rank=8)[0]
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 40)
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  task = get_task("language_modelling")
  loss = lambda t: multi_rank_loss(
    model,
    RankWeights(8),
    Objective("uniform"),
    task,
    {"tokens": t, "mask": mask},
    jnp.array([8, 2]),
  )[1]["loss"]
  repadded = jnp.where(mask, tokens, 39 - tokens)
  np.testing.assert_allclose(loss(tokens), loss(repadded), rtol=1e-6)
  logits = model(tokens, rank=8)[0][:, :-1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  weights = mask[:, 1:]
  np.testing.assert_allclose(loss(tokens)[0], (ce * weights).sum() / weights.sum(), rtol=1e-5)
