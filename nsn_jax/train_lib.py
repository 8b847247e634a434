"""Multi-rank training: `train_and_evaluate(config, workdir)`, the library behind train.py."""
from __future__ import annotations

import json
import logging
import signal
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import nsn_jax
from nsn_jax import flops, sharding
from nsn_jax.checkpoint import Checkpoints, abstract_tree, param_shapes
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.layers import nsn_layers
from nsn_jax.metrics import MetricWriter, Progress, say
from nsn_jax.models import build_model
from nsn_jax.objective import Objective, RankWeights, multi_rank_loss
from nsn_jax.ranks import RankSource, held_out_ranks, rank_source_from_config


class TrainTarget(nnx.Module):
  """What the optimizer updates: the model and the learned per-rank log-variances."""

  def __init__(self, model: nnx.Module, rank_weights: RankWeights):
    self.model = model
    self.rank_weights = rank_weights


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay to 0 over `config.train.steps`."""
  if not 0 <= config.optimizer.warmup_steps < config.train.steps:
    raise ValueError(f"optimizer.warmup_steps={config.optimizer.warmup_steps} must be in "
                     f"[0, train.steps={config.train.steps}).")
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.optimizer.learning_rate, config.optimizer.warmup_steps, config.train.steps)
  return optax.adamw(schedule, weight_decay=config.optimizer.weight_decay)


def build_target(config: ml_collections.ConfigDict) -> TrainTarget:
  """The model and one log-variance per rank 1..R, initialised from `config.seed`."""
  model = build_model(config, seed=config.seed)
  return TrainTarget(model, RankWeights(flops.max_rank(model)))


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(graphdef, state, state shardings) of (TrainTarget, optimizer), laid out on `mesh`.

  The state is traced as shapes first, its shardings derived from `config.sharding` rules, and
  then materialised by one jitted init straight into that layout: no device ever holds the
  whole model unless the rules replicate it.
  """
  tx = make_optimizer(config)

  def init():
    target = build_target(config)
    return target, nnx.Optimizer(target, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(init))
  rules = sharding.rules_from_config(config.get("sharding"))
  state_sharding = sharding.tree_shardings(abstract_state, mesh, rules)
  state = jax.jit(lambda: nnx.split(init())[1], out_shardings=state_sharding)()
  return graphdef, state, state_sharding


def checkpoint_metadata(config, model: nnx.Module, source: RankSource, step: int) -> dict:
  """What a checkpoint says about itself; eval.py rebuilds the model from it."""
  return {
      "config": json.loads(config.to_json_best_effort()),
      "nsn_layers": {path: {"in_features": l.in_features, "out_features": l.out_features,
                            "max_rank": l.max_rank}
                     for path, l in nsn_layers(model).items()},
      "max_rank": flops.max_rank(model),
      "trained_ranks": list(source.trained_ranks()),
      "held_out_ranks": list(held_out_ranks(source)),
      "param_shapes": param_shapes(nnx.to_pure_dict(nnx.state(model))),
      "library_version": nsn_jax.__version__,
      "step": step,
  }


def _check_batch(config, mesh) -> None:
  split = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % split or config.train.batch_size % jax.process_count():
    raise ValueError(f"train.batch_size={config.train.batch_size} must be divisible by the "
                     f"data × fsdp axes ({split} devices) and the process count "
                     f"({jax.process_count()}).")


class _StopFlag:
  """Set by SIGTERM (preemption): the loop saves a checkpoint and returns at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint and stopping.")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       metrics_dir: str | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its checkpoint) and returns final eval metrics.

  Writes workdir/checkpoints (orbax; local or gs://) and metrics_dir/metrics.jsonl and
  metrics_dir/tensorboard (metrics_dir defaults to the workdir; it must be local, since the
  JSONL file is appended to).
  """
  total_steps = config.train.steps
  metrics_dir = metrics_dir or workdir
  if "://" in metrics_dir:
    raise ValueError(f"metrics are appended to local files, so they cannot go to {metrics_dir}; "
                     "pass a local --metrics_dir (checkpoints still go to the workdir).")

  # ----- Mesh and sharding rules, from the config; checked before anything compiles. -----
  mesh = sharding.make_mesh(config.mesh)
  _check_batch(config, mesh)
  replicated = NamedSharding(mesh, P())
  batch_sharding = sharding.batch_sharding(mesh)

  # ----- Input: this process's slice of each global batch; batch `step` replays on resume. -----
  train_batches = pipeline.train_batches(
      config.data, config.train.batch_size, config.seed, jax.process_index(),
      jax.process_count())
  eval_images, eval_labels = pipeline.load_split(config.data, config.data.eval_split)

  # ----- Model, log-variances, optimizer: shapes first, then created directly sharded. -----
  objective = Objective.named(config.objective.name, config.objective.logits_weight,
                              config.objective.ortho_weight)
  graphdef, state, state_sharding = create_train_state(config, mesh)
  target = nnx.merge(graphdef, state)[0]
  source = rank_source_from_config(config.ranks, target.rank_weights.log_var.shape[0],
                                   total_steps, config.seed)

  # ----- Resume order: this workdir's newest readable checkpoint, else from scratch. -----
  checkpoints = Checkpoints(f"{workdir}/checkpoints", config.train.max_to_keep)
  params, train = split_for_checkpoint(state)
  restored = checkpoints.restore(abstract_tree(params), abstract_tree(train))
  start_step = 0
  if restored is not None:
    start_step, params, train, _ = restored
    nnx.replace_by_pure_dict(state, join_checkpoint(params, train))
    say(f"resumed from step {start_step} of {checkpoints.directory}")

  # ----- The update step: jitted once, state donated, ranks passed as data. -----
  def train_step(state, batch, ranks):
    target, optimizer = nnx.merge(graphdef, state)

    def loss_fn(target):
      return multi_rank_loss(target.model, target.rank_weights, objective, batch["image"],
                             batch["label"], ranks)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(target)
    optimizer.update(target, grads)
    return nnx.state((target, optimizer)), {"total_loss": loss, **aux}

  train_step = jax.jit(train_step, donate_argnums=0,
                       in_shardings=(state_sharding, batch_sharding, replicated),
                       out_shardings=(state_sharding, replicated))
  evaluator = RankEvaluator(nnx.graphdef(target.model), config.eval.batch_size)

  def evaluate(step: int) -> dict[str, float]:
    params = state[0]["model"]
    scalars = {}
    for rank in config.eval.ranks:
      metrics = evaluator(params, eval_images, eval_labels, int(rank))
      scalars.update({f"eval/rank_{rank}/{k}": v for k, v in metrics.items()
                      if k != "latency_s"})
    writer.write(step, scalars)
    return scalars

  def save(step: int) -> None:
    checkpoints.save(step, *split_for_checkpoint(state),
                     checkpoint_metadata(config, target.model, source, step))

  # ----- Loop: dispatch step t, then fetch step t−1's metrics so the host never stalls. -----
  writer = MetricWriter(metrics_dir)
  progress = Progress(total_steps, start_step)
  stop = _StopFlag()
  batches = pipeline.iterate(train_batches, start_step)
  pending = None
  step = saved_step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      local_batch = next(batches)
      batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
               for k, v in local_batch.items()}
      ranks = source(step - 1)
      state, metrics = train_step(state, batch, jnp.asarray(ranks))
      if pending is not None:
        _log_train(writer, progress, *pending, config)
      pending = (step, ranks, metrics)
      if stop.requested:
        break
      if step % config.eval.every == 0 and step != total_steps:
        evaluate(step)
      if step % config.train.checkpoint_every == 0:
        save(step)
        saved_step = step
    if pending is not None:
      _log_train(writer, progress, *pending, config, force=True)
    if step != saved_step:
      save(step)
    final = evaluate(step)
    checkpoints.wait()
  finally:
    stop.restore()
    writer.close()
    checkpoints.close()
  return final


def split_for_checkpoint(state: nnx.State) -> tuple[dict, dict]:
  """The (target, optimizer) state as the checkpoint's two items, pure dicts of arrays:
  params (the model: all eval needs) and train (log-variances, optimizer state)."""
  pure = nnx.to_pure_dict(state)
  return pure[0]["model"], {"rank_weights": pure[0]["rank_weights"], "optimizer": pure[1]}


def join_checkpoint(params: dict, train: dict) -> dict:
  """Inverse of `split_for_checkpoint`."""
  return {0: {"model": params, "rank_weights": train["rank_weights"]}, 1: train["optimizer"]}


def _log_train(writer, progress, step, ranks, metrics, config, force=False) -> None:
  if not (force or step % config.train.log_every == 0):
    return
  metrics = jax.device_get(metrics)
  scalars = {"train/total_loss": float(metrics["total_loss"])}
  for i, r in enumerate(np.asarray(ranks)):
    for name in ("loss", "accuracy", "log_var"):
      scalars[f"train/rank_{r}/{name}"] = float(metrics[name][i])
  writer.write(step, scalars)
  anchor = int(np.argmax(ranks))  # the objective can go negative (it includes Σ s_r): show CE
  progress.report(step, **{f"ce@{ranks[anchor]}": float(metrics["loss"][anchor]),
                           f"acc@{ranks[anchor]}": float(metrics["accuracy"][anchor])})
