"""The multi-rank objective: vmap == loop == buckets, s is trained, exp(-s) -> 1/L, presets."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsn_jax import sharding
from nsn_jax.methods import build_method
from nsn_jax.models.mlp import NSNMLP
from nsn_jax.objective import Objective, RankWeights, multi_rank_loss
from nsn_jax.ranks import DEFAULT_BUCKET_PRICE, BucketPlan, BucketPrice, bucket_price
from nsn_jax.tasks import get_task
from nsn_jax.train_step import create_train_state, make_train_step, trainable

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


DEMO_RANKS = (64, 32, 16, 8, 7, 6, 5, 4, 3, 2, 1)


@pytest.mark.parametrize("name", ["uncertainty_logits", "uncertainty_ortho", "anchor_only"])
@pytest.mark.parametrize("ranks", [DEMO_RANKS, (8, 4, 2), (64,), (5, 3), (2, 64, 5, 4)])
def test_buckets_and_static_loop_equal_the_vmapped_masked_step(ranks, name):
  """train.multi_rank=bucketed and loop_static: the loss, per-rank metrics and gradients of
  vmap_masked, in the step's rank order ((2, 64, 5, 4) is unsorted)."""
  model = NSNMLP(6, (16, 16), 3, max_rank=64, rngs=nnx.Rngs(3))
  weights = RankWeights(64)
  weights.log_var[...] = jnp.linspace(-0.5, 0.5, 64)
  x = jax.random.normal(jax.random.key(1), (32, 6))
  batch = {"image": x, "label": jax.random.randint(jax.random.key(2), (32,), 0, 3)}
  graphdef, state = nnx.split((model, weights))  # jitted below: nnx modules go in as state
  run = lambda state, ranks: nnx.value_and_grad(
    lambda m: multi_rank_loss(m[0], m[1], Objective.named(name), IMAGES, batch, ranks),
    has_aux=True,
  )(nnx.merge(graphdef, state))
  (loss, aux), grads = jax.jit(run)(state, jnp.asarray(ranks, jnp.int32))
  for plan in (BucketPlan.auto(ranks), BucketPlan.singletons(ranks)):
    (plan_loss, plan_aux), plan_grads = jax.jit(run, static_argnums=1)(state, plan)
    np.testing.assert_allclose(plan_loss, loss, rtol=1e-5)
    for key in aux:
      np.testing.assert_allclose(plan_aux[key], aux[key], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(plan_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_automatic_bucket_plan_is_a_pure_function_of_the_rank_set():
  plan = BucketPlan.auto(DEMO_RANKS)
  assert plan.buckets == ((64,), (32,), (16,), (8, 7, 6, 5), (4, 3, 2, 1))
  assert plan == BucketPlan.auto(list(DEMO_RANKS))
  assert hash(plan) == hash(BucketPlan.auto(DEMO_RANKS))  # static under jit: hashable
  assert BucketPlan.auto(DEMO_RANKS[::-1]).buckets == plan.buckets  # any order, same buckets
  assert plan.describe(64) == (
    "multi-rank buckets: [64] [32] [16] [8,7,6,5] [4,3,2,1] — 1.08× Σr rank-width units "
    "vs 4.76× for vmap_masked"
  )
  free = BucketPrice(overhead=0.0, max_buckets=None)
  assert BucketPlan.auto(DEMO_RANKS, free) == BucketPlan.singletons(DEMO_RANKS)
  assert bucket_price("cpu") == free  # measured fastest on CPU (docs/benchmarks.md)
  assert bucket_price("gpu") == bucket_price("tpu") == DEFAULT_BUCKET_PRICE
  assert BucketPlan.auto(DEMO_RANKS, BucketPrice(1000.0, 6)).buckets == (DEMO_RANKS,)
  assert len(BucketPlan.auto(range(1, 65), BucketPrice(0.0, 6)).buckets) == 6  # the cap
  assert BucketPlan.auto((2, 64, 5, 4)).order() == (3, 0, 1, 2)  # buckets run sorted
  with pytest.raises(ValueError, match="do not group"):
    BucketPlan((8, 4), ((8,),))


def test_bucketed_step_compiles_once(smoke_config):
  """A jitted bucketed step (configs/default.py:smoke, train.multi_rank=bucketed) traces once
  over repeated calls; its per-rank metrics come in the order of ranks.fixed."""
  smoke_config.train.multi_rank = "bucketed"
  smoke_config.ranks.fixed = (2, 8, 4)
  method = build_method(smoke_config, IMAGES, smoke_config.model.max_rank)
  assert method.plan == BucketPlan.auto((2, 8, 4), bucket_price(jax.default_backend()))
  assert method.start_line().startswith("multi-rank")
  mesh = sharding.make_mesh(smoke_config.mesh, jax.devices()[:1])
  graphdef, state, state_sharding = create_train_state(smoke_config, mesh)
  traces = []

  def loss(*args):
    traces.append(1)
    return method.loss(*args)

  batch_sharding = sharding.batch_sharding(mesh)
  step = make_train_step(graphdef, loss, trainable(smoke_config), state_sharding, batch_sharding)
  rng = np.random.default_rng(0)
  for i in range(3):
    before = jax.tree.map(jnp.copy, state)  # the step donates its state
    batch = {
      "image": rng.random((32, 28, 28, 1), np.float32),
      "label": rng.integers(0, 10, 32, dtype=np.int32),
    }
    inputs = method.step_inputs(i + 1)
    state, metrics = step(state, jax.device_put(batch, batch_sharding), inputs, None)
  assert len(traces) == 1 and bool(metrics["finite"])
  model = nnx.merge(graphdef, before).model  # the metrics are of the state before the update
  ce = [
    optax.softmax_cross_entropy_with_integer_labels(
      model(batch["image"], rank=int(r)), batch["label"]
    )
    for r in inputs
  ]
  np.testing.assert_allclose(metrics["loss"], np.mean(ce, axis=1), rtol=1e-5)


def test_language_modelling_scores_only_real_next_tokens():
  """Padding (mask False) is never a target: changing padded tokens changes nothing."""
  from nsn_jax.models.llama import LlamaConfig, LlamaModel
  from nsn_jax.surgery import decompose_and_replace

  config = LlamaConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24)
  model = decompose_and_replace(LlamaModel(config, rngs=nnx.Rngs(0)), max_rank=8)[0]
  tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 40)
  mask = jnp.arange(10)[None] < jnp.array([[10], [6]])
  task = get_task("language_modelling")
  loss = nnx.jit(  # compiled once: eagerly, every op of both calls dispatches on its own
    lambda m, t: multi_rank_loss(
      m, RankWeights(8), Objective("uniform"), task, {"tokens": t, "mask": mask}, jnp.array([8, 2])
    )[1]["loss"]
  )
  repadded = jnp.where(mask, tokens, 39 - tokens)
  np.testing.assert_allclose(loss(model, tokens), loss(model, repadded), rtol=1e-6)
  logits = model(tokens, rank=8)[0][:, :-1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
  weights = mask[:, 1:]
  np.testing.assert_allclose(
    loss(model, tokens)[0], (ce * weights).sum() / weights.sum(), rtol=1e-5
  )


@pytest.mark.parametrize("chunk", [5, 64])
@pytest.mark.parametrize("ranks", [jnp.array([8, 2], jnp.int32), BucketPlan.auto((8, 6, 2))])
def test_chunked_language_modelling_loss_equals_whole_logits(chunk, ranks):
  """train.loss_chunk: scoring a few positions at a time (chunks that divide T−1 = 11 or not,
  or exceed it) gives the losses, accuracies and gradients of the whole (B, T, vocab) logits,
  masked-vmapped or bucketed, with padded rows."""
  from nsn_jax.models.llama import LlamaConfig, LlamaModel
  from nsn_jax.surgery import decompose_and_replace

  config = LlamaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)
  model = decompose_and_replace(LlamaModel(config, rngs=nnx.Rngs(0)), max_rank=8)[0]
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, 40)
  batch = {"tokens": tokens, "mask": jnp.arange(12)[None] < jnp.array([[12], [7], [3]])}

  def run(task):
    loss = lambda m: multi_rank_loss(m, RankWeights(8), Objective(), task, batch, ranks)
    (value, aux), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return value, aux, grads

  whole, chunked = run(get_task("language_modelling")), run(get_task("language_modelling", chunk))
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-5)
  for key in ("loss", "accuracy"):
    np.testing.assert_allclose(chunked[1][key], whole[1][key], rtol=1e-5)
  for ours, theirs in zip(jax.tree.leaves(chunked[2]), jax.tree.leaves(whole[2])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  scores = lambda task: jax.make_jaxpr(lambda: task.rank_scores(model, batch, 8))()
  assert "scan" in str(scores(get_task("language_modelling", chunk)))  # chunks, really
  assert "scan" not in str(scores(get_task("language_modelling")))


@pytest.mark.parametrize("chunk", [0, 5])
def test_per_row_scores_sum_to_the_batch_scores_and_score_each_row_alone(chunk):
  """per_row=True (what bootstrap intervals resample): each row's sums are that row scored on
  its own, they add up to the batch's sums, and a dropped (padded) row scores zero, chunked or
  not."""
  from nsn_jax.models.llama import LlamaConfig, LlamaModel
  from nsn_jax.surgery import decompose_and_replace

  config = LlamaConfig(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24)
  model = decompose_and_replace(LlamaModel(config, rngs=nnx.Rngs(0)), max_rank=8)[0]
  tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, 40)
  batch = {"tokens": tokens, "mask": jnp.arange(12)[None] < jnp.array([[12], [7], [3]])}
  task = get_task("language_modelling", chunk)
  rows = jnp.array([1.0, 1.0, 0.0])
  per_row = task.rank_scores(model, batch, 4, rows, per_row=True)
  whole = task.rank_scores(model, batch, 4, rows)
  for key in ("loss", "correct", "weight"):
    assert per_row[key].shape == (3,)
    np.testing.assert_allclose(per_row[key].sum(), whole[key], rtol=1e-5)
    assert per_row[key][2] == 0.0
  np.testing.assert_allclose(per_row["weight"][:2], [11.0, 6.0])
  for i in range(2):
    alone = task.rank_scores(model, {k: v[i : i + 1] for k, v in batch.items()}, 4)
    np.testing.assert_allclose(per_row["loss"][i], alone["loss"], rtol=1e-5)
