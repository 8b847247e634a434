"""Multi-rank training: `train_and_evaluate(config, workdir)`, the library behind train.py."""
from __future__ import annotations

import json
import logging
import re
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
from nsn_jax.models.build import PRETRAINED, build_model, text_encoder
from nsn_jax.objective import LogVariance, Objective, RankWeights, multi_rank_loss
from nsn_jax.ranks import RankSource, held_out_ranks, rank_source_from_config
from nsn_jax.tasks import get_task


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


def build_target(config: ml_collections.ConfigDict, pretrained: bool = True,
                 calibrate=None) -> TrainTarget:
  """The model and one log-variance per rank 1..R, initialised from `config.seed` (and, for a
  pretrained family with `pretrained`, the checkpoint it names)."""
  model = build_model(config, seed=config.seed, pretrained=pretrained, calibrate=calibrate)
  return TrainTarget(model, RankWeights(flops.rank_count(model)))


def trainable(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  """What the optimizer updates: the parameters whose path matches a regex of
  `train.trainable` (default ("",): all), e.g. ("mlp/", "head") freezes attention and
  embeddings; NSN factors live on the path of the layer they replace. The learned
  log-variances always train."""
  rules = [re.compile(rule) for rule in config.train.get("trainable", ("",))]
  if not rules:
    raise ValueError("train.trainable is empty: nothing would train.")

  def selected(path, value) -> bool:
    return (isinstance(value, nnx.Param) and
            any(rule.search("/".join(map(str, path))) for rule in rules))

  return nnx.Any(LogVariance, selected)


def create_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       calibrate=None):
  """(graphdef, state, state shardings) of (TrainTarget, optimizer), laid out on `mesh`.

  The state is traced as shapes first and its shardings derived from `config.sharding` rules.
  A from-scratch model is then materialised by one jitted init straight into that layout: no
  device ever holds the whole model unless the rules replicate it. A pretrained one is read on
  the host (the weights come from a file) and placed into the same layout.
  """
  tx = make_optimizer(config)
  wrt = trainable(config)

  def init(pretrained):
    target = build_target(config, pretrained, calibrate)
    return target, nnx.Optimizer(target, tx, wrt=wrt)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: init(False)))
  rules = sharding.rules_from_config(config.get("sharding"))
  state_sharding = sharding.tree_shardings(abstract_state, mesh, rules)
  if config.model.name in PRETRAINED:
    graphdef, state = nnx.split(init(True))
    state = jax.device_put(state, state_sharding)
  else:
    state = jax.jit(lambda: nnx.split(init(False))[1], out_shardings=state_sharding)()
  return graphdef, state, state_sharding


def checkpoint_metadata(config, model: nnx.Module, source: RankSource, step: int) -> dict:
  """What a checkpoint says about itself; eval.py rebuilds the model from it."""
  return {
      "config": json.loads(config.to_json_best_effort()),
      "nsn_layers": {path: {"in_features": l.in_features, "out_features": l.out_features,
                            "max_rank": l.max_rank}
                     for path, l in nsn_layers(model).items()},
      "max_rank": flops.rank_count(model),
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
  task = get_task(config.get("task", "image_classification"))
  encoder = text_encoder(config)
  train_batches = pipeline.train_batches(
      config.data, config.train.batch_size, config.seed, jax.process_index(),
      jax.process_count(), encoder)
  eval_arrays = pipeline.load_split(config.data, config.data.eval_split, encoder)

  # ----- Model, log-variances, optimizer: shapes first, then created directly sharded. -----
  objective = Objective.named(config.objective.name, config.objective.logits_weight,
                              config.objective.ortho_weight)
  graphdef, state, state_sharding = create_train_state(
      config, mesh, _calibration(config, task, train_batches))
  target = nnx.merge(graphdef, state)[0]
  source = rank_source_from_config(config.ranks, target.rank_weights.log_var.shape[0],
                                   total_steps, config.seed)
  static_ranks = _static_ranks(config, source)

  # ----- Resume order: this workdir's newest readable checkpoint, else from scratch. -----
  checkpoints = Checkpoints(f"{workdir}/checkpoints", config.train.max_to_keep)
  params, train = split_for_checkpoint(state)
  restored = checkpoints.restore(abstract_tree(params), abstract_tree(train))
  start_step = 0
  if restored is not None:
    start_step, params, train, _ = restored
    nnx.replace_by_pure_dict(state, join_checkpoint(params, train))
    say(f"resumed from step {start_step} of {checkpoints.directory}")

  # ----- The update step: jitted once, state donated, ranks passed as data (vmap_masked) or
  # baked in as the fixed static set (loop_static). Frozen parameters get no gradients. -----
  wrt = trainable(config)

  def train_step(state, batch, ranks):
    target, optimizer = nnx.merge(graphdef, state)

    def loss_fn(target):
      return multi_rank_loss(target.model, target.rank_weights, objective, task, batch,
                             ranks if static_ranks is None else static_ranks)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt),
                                            has_aux=True)(target)
    optimizer.update(target, grads)
    return nnx.state((target, optimizer)), {"total_loss": loss, **aux}

  train_step = jax.jit(train_step, donate_argnums=0,
                       in_shardings=(state_sharding, batch_sharding, replicated),
                       out_shardings=(state_sharding, replicated))
  evaluator = RankEvaluator(nnx.graphdef(target.model), config.eval.batch_size, task)

  def evaluate(step: int) -> dict[str, float]:
    params = state[0]["model"]
    scalars = {}
    for rank in config.eval.ranks:
      metrics = evaluator(params, eval_arrays, int(rank))
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


def _static_ranks(config, source: RankSource) -> tuple[int, ...] | None:
  """The fixed rank set as static ints for `train.multi_rank=loop_static`; None for the default
  `vmap_masked` (ranks are data, one program for every draw)."""
  strategy = config.train.get("multi_rank", "vmap_masked")
  if strategy == "vmap_masked":
    return None
  if strategy != "loop_static":
    raise ValueError(f"train.multi_rank must be 'vmap_masked' or 'loop_static', got "
                     f"{strategy!r}.")
  if config.ranks.kind != "fixed":
    raise ValueError("train.multi_rank=loop_static compiles one program per rank set, so it "
                     "needs ranks.kind=fixed; drawn ranks need vmap_masked.")
  return tuple(int(r) for r in source(0))


def _calibration(config, task, train_batches):
  """For `surgery.init=activation_aware`: runs the dense model on the first
  `surgery.calibration_batches` training batches (rank None), eagerly, so the surgery can record
  each chosen layer's inputs. None otherwise."""
  surgery = config.get("surgery")
  if not surgery or surgery.get("init", "svd") != "activation_aware":
    return None

  def calibrate(model):
    for step in range(surgery.get("calibration_batches", 4)):
      batch = {k: jnp.asarray(v) for k, v in train_batches[step].items()}
      task.logits(model, batch, None)

  return calibrate


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
