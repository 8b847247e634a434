"""Multi-rank training: `train_and_evaluate(config, workdir)`, the library behind train.py."""
from __future__ import annotations

from collections.abc import Sequence
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
from nsn_jax import flops, profiles, sharding
from nsn_jax.checkpoint import Checkpoints, abstract_tree, param_shapes
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.layers import nsn_layers
from nsn_jax.metrics import MetricWriter, Progress, say
from nsn_jax.models.build import (PRETRAINED, build_model, build_pretrained, mismatches,
                                  text_encoder)
from nsn_jax.objective import (DISTILL, LogVariance, Objective, RankWeights, distillation_loss,
                               multi_rank_loss)
from nsn_jax.ranks import RankSource, held_out_ranks, rank_source_from_config
from nsn_jax.sweep import load_params
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
                 calibrate=None, model: nnx.Module | None = None) -> TrainTarget:
  """The model and one log-variance per rank 1..R, initialised from `config.seed` (and, for a
  pretrained family with `pretrained`, the checkpoint it names); `model` if already built."""
  if model is None:
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
                       calibrate=None, pretrained_model: nnx.Module | None = None):
  """(graphdef, state, state shardings) of (TrainTarget, optimizer), laid out on `mesh`.

  `pretrained_model`: a pretrained family's model already built (`build_pretrained`, as
  `train_and_evaluate` does, from the pretrained file or `model.init_from`'s twin), placed
  instead of building it again; without it the model comes from the pretrained file.

  The state is traced as shapes first and its shardings derived from `config.sharding` rules.
  A from-scratch model is then materialised by one jitted init straight into that layout: no
  device ever holds the whole model unless the rules replicate it. A pretrained one is read on
  the host (the weights come from a file) and placed into the same layout.
  """
  tx = make_optimizer(config)
  wrt = trainable(config)

  def init(pretrained):
    target = build_target(config, pretrained, calibrate, pretrained_model if pretrained else None)
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


def checkpoint_metadata(config, model: nnx.Module, source: RankSource | profiles.ProfileSampler,
                        step: int, found: Sequence[dict] = ()) -> dict:
  """What a checkpoint says about itself; eval.py rebuilds the model from it. `found`: the
  FlexRank profiles (`profiles.search_profiles`), saved with whether distillation trained them."""
  flexrank = {"profiles": list(found),
              "probabilities": list(getattr(source, "probabilities", ())),
              "trained": isinstance(source, profiles.ProfileSampler)} if found else {}
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
      **({"flexrank": flexrank} if flexrank else {}),
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

  # ----- A pretrained family: surgery on the pretrained model (or on model.init_from's dense
  # twin). FlexRank (flexrank.budgets): nested profiles from the calibration batches; with
  # objective flexrank_distill the dense model before surgery is the frozen teacher. -----
  distill = config.objective.name == DISTILL
  calibrate = _calibration(config, task, train_batches)
  pretrained_model, teacher, found = _pretrained(config, calibrate, distill)

  # ----- Model, log-variances, optimizer: shapes first, then created directly sharded. -----
  objective = None if distill else Objective.named(
      config.objective.name, config.objective.logits_weight, config.objective.ortho_weight)
  graphdef, state, state_sharding = create_train_state(config, mesh, calibrate, pretrained_model)
  target = nnx.merge(graphdef, state)[0]
  max_rank = target.rank_weights.log_var.shape[0]
  if distill:  # each step trains one profile; its per-layer ranks are the step's "ranks"
    source = profiles.ProfileSampler.create(found, config.flexrank.probabilities, config.seed,
                                            max_rank)
    static_ranks = None
  else:
    source = rank_source_from_config(config.ranks, max_rank, total_steps, config.seed)
    static_ranks = _static_ranks(config, source)
  teacher_graphdef, teacher_state, teacher_sharding = None, None, None
  if teacher is not None:  # an argument of the step, not a constant baked into the program
    teacher_graphdef, teacher_state = nnx.split(teacher)
    teacher_sharding = sharding.tree_shardings(
        teacher_state, mesh, sharding.rules_from_config(config.get("sharding")))
    # Placed, then copied by a program (fresh buffers): the layers the surgery kept are the very
    # buffers of the student's state, which each step donates (device_put(may_alias=False)
    # still shared some).
    teacher_state = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=teacher_sharding)(
        jax.device_put(teacher_state, teacher_sharding))

  # ----- Resume order: this workdir's newest readable checkpoint, else from scratch. -----
  checkpoints = Checkpoints(f"{workdir}/checkpoints", config.train.max_to_keep)
  params, train = split_for_checkpoint(state)
  restored = checkpoints.restore(abstract_tree(params), abstract_tree(train))
  start_step = 0
  if restored is not None:
    start_step, params, train, metadata = restored
    _check_same_profiles(metadata, found, checkpoints.directory)
    nnx.replace_by_pure_dict(state, join_checkpoint(params, train))
    say(f"resumed from step {start_step} of {checkpoints.directory}")

  # ----- The update step: jitted once, state donated, ranks passed as data (vmap_masked; a
  # distilled profile's per-layer ranks) or baked in as the fixed static set (loop_static).
  # Frozen parameters and the teacher get no gradients. -----
  wrt = trainable(config)

  def train_step(state, batch, ranks, teacher_state):
    target, optimizer = nnx.merge(graphdef, state)

    def loss_fn(target):
      if distill:
        return distillation_loss(target.model, nnx.merge(teacher_graphdef, teacher_state), task,
                                 batch, source.profile(ranks))
      return multi_rank_loss(target.model, target.rank_weights, objective, task, batch,
                             ranks if static_ranks is None else static_ranks)

    (loss, aux), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt),
                                            has_aux=True)(target)
    optimizer.update(target, grads)
    return nnx.state((target, optimizer)), {"total_loss": loss, **aux}

  train_step = jax.jit(train_step, donate_argnums=0,
                       in_shardings=(state_sharding, batch_sharding, replicated,
                                     teacher_sharding),
                       out_shardings=(state_sharding, replicated))
  evaluator = RankEvaluator(nnx.graphdef(target.model), config.eval.batch_size, task)
  # Global ranks and then each profile (static per-layer ranks: one program per profile).
  eval_points = {f"rank_{rank}": int(rank) for rank in config.eval.ranks} | {
      f"profile_{budget:g}": profile for budget, profile in profiles.by_budget(found).items()}

  def evaluate(step: int) -> dict[str, float]:
    params = state[0]["model"]
    scalars = {}
    for name, rank in eval_points.items():
      metrics = evaluator(params, eval_arrays, rank)
      scalars.update({f"eval/{name}/{k}": v for k, v in metrics.items() if k != "latency_s"})
    writer.write(step, scalars)
    return scalars

  def save(step: int) -> None:
    checkpoints.save(step, *split_for_checkpoint(state),
                     checkpoint_metadata(config, target.model, source, step, found))

  # ----- Loop: dispatch step t, then fetch step t−1's metrics so the host never stalls. -----
  writer = MetricWriter(metrics_dir)

  def log(step, ranks, metrics, force=False):
    if distill:
      _log_distill(writer, progress, step, source, metrics, config, force)
    else:
      _log_train(writer, progress, step, ranks, metrics, config, force)

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
      state, metrics = train_step(state, batch, jnp.asarray(ranks), teacher_state)
      if pending is not None:
        log(*pending)
      pending = (step, ranks, metrics)
      if stop.requested:
        break
      if step % config.eval.every == 0 and step != total_steps:
        evaluate(step)
      if step % config.train.checkpoint_every == 0:
        save(step)
        saved_step = step
    if pending is not None:
      log(*pending, force=True)
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


def _pretrained(config, calibrate, distill: bool):
  """(model after surgery, teacher, profiles) for a pretrained family; (None, None, []) for a
  model trained from scratch (`create_train_state` builds it).

  The model and the dense model before surgery come from one `build_pretrained`, which starts
  from `model.init_from` when given. FlexRank (`flexrank.budgets`) adds the profiles of
  `profiles.search_profiles`; with `distill` the dense model is the teacher, else None.
  """
  budgets = tuple(float(b) for b in config.get("flexrank", {}).get("budgets", ()))
  if distill and not budgets:
    raise ValueError(f"objective {DISTILL!r} trains the profiles of flexrank.budgets: give "
                     "some, e.g. --config.flexrank.budgets='(0.3, 0.5, 0.7, 0.9)'.")
  if budgets and (config.model.name not in PRETRAINED or not config.surgery.max_rank):
    raise ValueError("flexrank.budgets needs a pretrained model with surgery "
                     "(surgery.max_rank > 0): profiles are searched against the dense layers "
                     "the surgery replaces, and the dense model is the distillation teacher.")
  if len(set(budgets)) != len(budgets):
    raise ValueError(f"flexrank.budgets {budgets} repeats a budget.")
  classifier = config.get("task") == "text_classification"
  if distill and classifier and not config.model.get("init_from"):
    # A pretrained backbone gets a new, zero-initialised head: its outputs carry nothing to distil.
    raise ValueError("distilling a classifier needs a fine-tuned teacher: train the dense twin "
                     "(surgery.max_rank=0) and pass its workdir as model.init_from.")
  if config.model.name not in PRETRAINED:
    if config.model.get("init_from"):
      raise ValueError("model.init_from starts a pretrained family from a fine-tuned dense run; "
                       f"{config.model.name!r} trains from scratch.")
    return None, None, []
  dense, model, calibration = build_pretrained(config, seed=config.seed, calibrate=calibrate,
                                               dense=restore_dense_twin(config))
  found = []
  if budgets:
    found = profiles.search_profiles(model, dense, calibration, budgets,
                                     config.data.get("seq_len"),
                                     config.flexrank.get("budget_unit", "flops"))
  return model, dense if distill else None, found


def _check_same_profiles(metadata: dict, found: Sequence[dict], directory: str) -> None:
  """Refuses to resume when the FlexRank profiles searched now differ from those the checkpoint
  trained with: a resumed run must go on training the same profiles."""
  saved = metadata.get("flexrank", {}).get("profiles", [])
  if profiles.by_budget(saved) != profiles.by_budget(found):
    raise ValueError(f"the FlexRank profiles searched now differ from those the checkpoint in "
                     f"{directory} was trained with. Resume with the same flexrank.budgets, "
                     "surgery and model.init_from (whose run must not have trained further), "
                     "or start a new workdir.")


def restore_dense_twin(config: ml_collections.ConfigDict) -> nnx.Module | None:
  """The dense model of the run in `model.init_from` (a twin fine-tuned on the same task with
  surgery.max_rank=0), which surgery then starts from instead of the pretrained file and a new
  head; None when unset. Raises ValueError if that run is not such a twin."""
  workdir = config.model.get("init_from")
  if not workdir:
    return None
  model, metadata, step = load_params(workdir)
  source = ml_collections.ConfigDict(metadata["config"])
  if source.get("surgery", {}).get("max_rank"):
    raise ValueError(f"model.init_from={workdir!r} is a nested run (surgery.max_rank="
                     f"{source.surgery.max_rank}); it must be a dense twin (surgery.max_rank=0).")
  differ = mismatches(config, source)
  if config.model.get("dtype", "float32") != source.model.get("dtype", "float32"):
    differ.append("model.dtype")  # the twin's layers compute in its own dtype
  if differ:
    raise ValueError(f"model.init_from={workdir!r} was trained with another "
                     f"{', '.join(differ)}; it must be the same model on the same task.")
  say(f"starting from the dense run {workdir} at step {step}")
  return model


def _calibration(config, task, train_batches):
  """For `surgery.init=activation_aware` or FlexRank's profile search (`flexrank.budgets`):
  runs the dense model on the first `surgery.calibration_batches` training batches (rank None),
  eagerly, so each chosen layer's inputs can be recorded. None otherwise."""
  surgery = config.get("surgery")
  if not surgery or (surgery.get("init", "svd") != "activation_aware"
                     and not config.get("flexrank", {}).get("budgets")):
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


def _log_distill(writer, progress, step, source: profiles.ProfileSampler, metrics, config,
                 force=False) -> None:
  if not (force or step % config.train.log_every == 0):
    return
  metrics = jax.device_get(metrics)
  budget = source.budgets[source.index(step - 1)]
  writer.write(step, {"train/total_loss": float(metrics["total_loss"]),
                      "train/budget": budget,
                      **{f"train/{k}": float(metrics[k]) for k in ("kl", "loss", "accuracy")}})
  progress.report(step, **{f"kl@{budget:g}": float(metrics["kl"]),
                           f"ce@{budget:g}": float(metrics["loss"])})


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
