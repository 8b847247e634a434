"""A fixed rank set's shared first layers (rank_sharing) and the vmapped layers' rules
(vmap_rules): the same values and gradients as each rank alone, with fewer FLOPs."""

import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsn_jax import objective, rank_sharing, vmap_rules
from nsn_jax.layers import NSNDense, WidthRank
from nsn_jax.models.mlp import NSNMLP
from nsn_jax.ranks import BucketPlan

PLANS = [
  BucketPlan.singletons((8, 4, 2, 1)),
  BucketPlan((2, 8, 5, 1), ((8, 5), (2, 1))),  # unsorted step order, two-rank buckets
]


def test_is_vmapped_sees_the_enclosing_vmap_while_tracing():
  """Batched → True, unbatched → False, also under grad; inside a scan body under the vmap the
  traced rank reads False, which is what makes `shared_output` decline there."""
  seen = {}

  def per_rank(r, x):
    seen["rank"], seen["x"], seen["x*r"] = map(vmap_rules.is_vmapped, (r, x, x * r))

    def body(carry, _):
      seen["rank in scan"] = vmap_rules.is_vmapped(r)
      return carry, None

    jax.lax.scan(body, 0.0, None, length=1)
    return (x * r).sum()

  jax.jit(jax.grad(lambda x: jax.vmap(per_rank, (0, None))(jnp.arange(3.0), x).sum()))(jnp.ones(4))
  assert seen == {"rank": True, "x": False, "x*r": True, "rank in scan": False}
  assert not vmap_rules.is_vmapped(jnp.ones(3))


@pytest.mark.parametrize("bias", [True, False])
def test_nested_outputs_are_each_ranks_output(bias):
  layer = NSNDense(6, 5, 8, use_bias=bias, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 6))  # any leading axes
  ranks = (1, 3, 4, 8)
  outputs = rank_sharing.nested_outputs(
    x, layer.a[...], layer.b[...], layer.bias[...] if bias else None, ranks
  )
  for r, y in zip(ranks, outputs):
    np.testing.assert_allclose(y, layer(x, rank=r), rtol=1e-5, atol=1e-6)


def _mlp_loss(plan):
  model = NSNMLP(64, (16, 16), 3, max_rank=8, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(1), (12, 64))
  graphdef, state = nnx.split(model)

  def loss(state, ranks):
    model = nnx.merge(graphdef, state)
    if ranks is None:  # each rank alone, static slices, nothing shared
      return sum(jnp.sum(model(x, r) ** 2) for r in plan.ranks)
    return jnp.sum(objective.per_rank(lambda r: jnp.sum(model(x, r) ** 2), ranks))

  return loss, state


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_shared_plan_equals_each_rank_alone_with_fewer_flops(plan):
  """The first hidden layer's input is the batch, the same at every rank: the plan runs it once
  for the whole set (one dot at width 8, not 8 + 4 + 2 + 1); loss and gradients are unchanged."""
  loss, state = _mlp_loss(plan)
  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, plan)
  alone, alone_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(state, None)
  np.testing.assert_allclose(value, alone, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(alone_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def flops(ranks):
    compiled = jax.jit(jax.grad(loss), static_argnums=1).lower(state, ranks).compile()
    return compiled.cost_analysis()["flops"]

  assert flops(plan) < 0.9 * flops(None)  # 0.82 and 0.83: the input is 64 wide, layers 16


def test_a_layer_inside_a_scan_is_not_shared_and_stays_exact():
  """Inside a scan body the traced rank reads as unbatched, so the layer runs alone there."""
  layer = NSNDense(6, 5, 8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 6))
  plan = BucketPlan((8, 3), ((8, 3),))

  def at(rank):
    ys = jax.lax.scan(lambda carry, row: (carry, layer(row, rank=rank)), 0.0, x)[1]
    return ys

  out = jax.jit(lambda: objective.per_rank(at, plan))()
  for row, r in zip(out, plan.ranks):
    np.testing.assert_allclose(row, layer(x, rank=r), rtol=1e-5, atol=1e-6)


def test_buckets_that_trace_different_shared_inputs_are_an_error():
  layer = NSNDense(6, 5, 8, rngs=nnx.Rngs(0))
  x = jnp.ones((8, 6))
  plan = BucketPlan((8, 3), ((8,), (3,)))
  with pytest.raises(ValueError, match="every bucket must trace the same layers"):
    objective.per_rank(lambda rank: layer(x[: rank.width], rank=rank), plan)


@pytest.mark.parametrize("bucket", [1, 3])
def test_rank_matmul_gradients_equal_autodiff(bucket):
  """Under a vmap inside the gradient (a bucket of ranks), with an input every element shares,
  and per example (the gradient inside a vmap): each element's weight gradient is its own."""
  x = jax.random.normal(jax.random.key(0), (bucket, 7, 5))
  w = jax.random.normal(jax.random.key(1), (5, 4))
  scale = jnp.arange(1.0, bucket + 1)

  def loss(matmul, w, xs):
    return jnp.sum(jax.vmap(lambda x, s: jnp.sin(matmul(x, w)) * s)(xs, scale))

  def shared_loss(matmul, w, x):
    return jnp.sum(jax.vmap(lambda s: jnp.sin(matmul(x, w)) * s)(scale))

  def example_loss(matmul, w, x):
    return jnp.sum(jnp.sin(matmul(x, w)))

  per_example = lambda matmul, w, x: jax.vmap(jax.grad(example_loss, 1), (None, None, 0))(
    matmul, w, x
  )
  for f, args in ((loss, (w, x)), (shared_loss, (w, x[0])), (per_example, (w, x))):
    gradient = f if f is per_example else jax.grad(f, argnums=1)
    np.testing.assert_allclose(
      gradient(vmap_rules.rank_matmul, *args), gradient(jnp.matmul, *args), rtol=1e-5
    )
  for transposed in (False, True):  # the narrow side as the dot's rows, either way round
    a, b = (x[0], x[0] @ w) if not transposed else (x[0] @ w, x[0])
    np.testing.assert_allclose(vmap_rules.weight_gradient(a, b), a.T @ b, rtol=1e-5)


@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_per_example_gradients_of_a_plan_equal_each_rank_alones(plan):
  """vmap over examples of the gradient of a bucketed loss: the rank vmap is the innermost, so
  the weight-gradient rule sums over ranks only, never over examples."""
  layer = NSNDense(6, 5, 8, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  examples = jax.random.normal(jax.random.key(1), (len(plan.buckets[0]), 6))
  mix = jax.random.normal(jax.random.key(2), (5, 6))

  def at_rank(layer, example, rank):
    shared = jnp.tanh(example * 2.0)  # rank-independent: shared by the plan
    return jnp.sum(jnp.sin(layer(jnp.tanh(layer(shared, rank) @ mix), rank)))

  def loss(state, example, ranks):
    """ranks: the plan, or the same ranks as a tuple (each alone, static)."""
    layer = nnx.merge(graphdef, state)
    if isinstance(ranks, tuple):
      return sum(at_rank(layer, example, r) for r in ranks)
    return jnp.sum(objective.per_rank(lambda r: at_rank(layer, example, r), ranks))

  per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0, None)), static_argnums=2)
  for a, b in zip(
    jax.tree.leaves(per_example(state, examples, plan)),
    jax.tree.leaves(per_example(state, examples, plan.ranks)),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_width_rank_outside_a_bucket_runs_the_layer_alone():
  layer = NSNDense(6, 5, 8, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 6))
  with rank_sharing.sharing((8, 3)):  # a WidthRank outside any bucket's vmap
    y = layer(x, rank=WidthRank(8, jnp.int32(3)))
  np.testing.assert_allclose(y, layer(x, rank=3), rtol=1e-5)


def test_keep_freed_memory_takes_effect_on_glibc():
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      "from nsn_jax import host_memory; print(host_memory.keep_freed_memory())",
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  assert out.stdout.strip() == "True"
