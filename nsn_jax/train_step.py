"""The train state and the one train step that train.py, the tests and the benchmarks run.

`TrainState` names what a step updates: the model, the learned per-rank log-variances and the
optimizer. `create_train_state` builds it directly in its sharded layout; `make_train_step`
jits one pure step `(state, batch, step_inputs, extra) → (state, metrics)` for a training
method (`nsn_jax.methods`), with the state donated and every sharding bound at construction.
"""

from __future__ import annotations

from collections.abc import Callable
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from nsn_jax import config as config_lib
from nsn_jax import flops, remat, sharding
from nsn_jax.build import build_model
from nsn_jax.objective import LogVariance, RankWeights


class TrainState(nnx.Module):
  """model; rank_weights (one learned log-variance per rank 1..R, None for a dense model);
  optimizer (AdamW over the parameters `trainable` selects, and the log-variances)."""

  def __init__(
    self,
    model: nnx.Module,
    rank_weights: RankWeights | None,
    tx: optax.GradientTransformation,
    wrt: nnx.filterlib.Filter,
  ):
    self.model = model
    self.rank_weights = rank_weights
    # Built over this state before `optimizer` exists: its moments mirror model/rank_weights.
    self.optimizer = nnx.Optimizer(self, tx, wrt=wrt)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay to 0 over `config.train.steps`."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, config.optimizer.learning_rate, config.optimizer.warmup_steps, config.train.steps
  )
  return optax.adamw(schedule, weight_decay=config.optimizer.weight_decay)


def trainable(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  """The parameters whose path matches a regex of `train.trainable` (("",) = all), e.g.
  ("mlp/", "head") freezes attention and embeddings; NSN factors live on the path of the layer
  they replace. The learned log-variances always train."""
  rules = [re.compile(rule) for rule in config.train.trainable]

  def selected(path, value) -> bool:
    return isinstance(value, nnx.Param) and any(
      rule.search("/".join(map(str, path))) for rule in rules
    )

  return nnx.Any(LogVariance, selected)


def create_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model: nnx.Module | None = None
) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """(graphdef, state, state shardings) of a `TrainState` laid out on `mesh`.

  `model`: a pretrained family's model already built (`nsn_jax.build.build_pretrained`), placed
  into the layout; without it the model is built from `config` with random weights.
  The state is traced as shapes first and its shardings derived from `config.sharding` rules.
  A from-scratch model is then materialised by one jitted init straight into that layout: no
  device ever holds the whole model unless the rules replicate it.
  """
  init = _initializer(config)
  graphdef, _, state_sharding = abstract_train_state(config, mesh, model)
  if model is not None:
    graphdef, state = nnx.split(init(model))
    state = jax.device_put(state, state_sharding)
  else:
    state = jax.jit(lambda: nnx.split(init())[1], out_shardings=state_sharding)()
  return graphdef, state, state_sharding


def abstract_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model: nnx.Module | None = None
) -> tuple[nnx.GraphDef, nnx.State, Any]:
  """(graphdef, the state as ShapeDtypeStructs carrying their shardings, the shardings): what
  `create_train_state` builds, as shapes only. Nothing is computed or allocated, so it serves
  to check a config's layout or lower its step (`jax.export`) for a mesh this host lacks."""
  init = _initializer(config)
  graphdef, shapes = nnx.split(nnx.eval_shape(init, model))
  state_sharding = sharding.config_shardings(shapes, mesh, config.sharding)
  placed = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, state_sharding
  )
  return graphdef, placed, state_sharding


def _initializer(config: ml_collections.ConfigDict) -> Callable[..., TrainState]:
  """model (or None: built from `config` with random weights) → a new TrainState."""
  tx, wrt = make_optimizer(config), trainable(config)

  def init(model=None):
    model = model or build_model(config, seed=config.seed, pretrained=False)
    weights = None if config.model.dense else RankWeights(flops.max_rank(model))
    return TrainState(model, weights, tx, wrt)

  return init


LossFn = Callable[[TrainState, dict, jax.Array, Any], tuple[jax.Array, dict]]


def make_train_step(
  graphdef: nnx.GraphDef,
  loss_fn: LossFn,
  wrt: nnx.filterlib.Filter,
  state_sharding: Any,
  batch_sharding: NamedSharding,
  extra_sharding: Any = None,
  remat_policy: str | None = None,
):
  """The jitted step `(state, batch, step_inputs, extra) → (state, metrics)`.

  `loss_fn(train_state, batch, step_inputs, extra) → (loss, aux)` is a method's loss
  (`nsn_jax.methods`): step_inputs are its per-step data (a rank vector, a profile's ranks),
  extra what it needs beside the state (FlexRank's teacher state; None otherwise). Only the
  parameters `wrt` selects get gradients. metrics = {total_loss, finite, **aux}: `finite` is a
  device-side flag, False when the loss or any updated parameter is NaN/inf, so the host can
  refuse to checkpoint a diverged state without stalling on every step. `remat_policy` (a
  `nsn_jax.remat.POLICIES` name) recomputes each model block in the backward pass.
  """
  replicated = NamedSharding(batch_sharding.mesh, P())

  @sharding.with_mesh(batch_sharding.mesh)  # models constrain their activations on it
  def step(state, batch, step_inputs, extra):
    train_state = nnx.merge(graphdef, state)
    with remat.rematerialised(remat_policy):
      (loss, aux), grads = nnx.value_and_grad(
        lambda s: loss_fn(s, batch, step_inputs, extra),
        argnums=nnx.DiffState(0, wrt),
        has_aux=True,
      )(train_state)
    train_state.optimizer.update(train_state, grads)
    finite = jnp.isfinite(loss)
    for x in jax.tree.leaves(nnx.state(train_state, wrt)):
      finite &= jnp.isfinite(x).all()
    return nnx.state(train_state), {"total_loss": loss, "finite": finite, **aux}

  return jax.jit(
    step,
    donate_argnums=0,
    in_shardings=(state_sharding, batch_sharding, replicated, extra_sharding),
    out_shardings=(state_sharding, replicated),
  )


def config_train_step(
  config: ml_collections.ConfigDict,
  graphdef: nnx.GraphDef,
  loss_fn: LossFn,
  state_sharding: Any,
  batch_sharding: NamedSharding,
  extra_sharding: Any = None,
):
  """`make_train_step` with what `config` decides: the parameters that train
  (`train.trainable`) and the remat policy (`train.remat`)."""
  return make_train_step(
    graphdef,
    loss_fn,
    trainable(config),
    state_sharding,
    batch_sharding,
    extra_sharding,
    config_lib.remat_policy(config),
  )


def split_for_checkpoint(state: nnx.State) -> tuple[dict, dict]:
  """The state as the checkpoint's two items, pure dicts of arrays: params (the model: all
  evaluation needs) and train (the log-variances and the optimizer)."""
  pure = nnx.to_pure_dict(state)
  return pure["model"], {k: v for k, v in pure.items() if k != "model"}


def join_checkpoint(params: dict, train: dict) -> dict:
  """Inverse of `split_for_checkpoint`."""
  return {"model": params, **train}
