"""Training: `train_and_evaluate(config, workdir)`, the library behind train.py.

The pieces live in their own modules: the config schema (`nsn_jax.config`), the models
(`nsn_jax.build`), the method (`nsn_jax.methods`), the state and its jitted step
(`nsn_jax.train_step`), checkpoints (`nsn_jax.checkpoint`). This module orders them and runs
the loop.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import functools
import json
import logging
import os
import signal
import threading
from typing import Any

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import numpy as np

import nsn_jax
from nsn_jax import config as config_lib
from nsn_jax import distributed, profiles, sharding
from nsn_jax.build import build_pretrained, check_model_fits, nsn_from_dense, text_encoder
from nsn_jax.checkpoint import Checkpoints, abstract_tree
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.layers import nsn_layers
from nsn_jax.methods import Method, build_method
from nsn_jax.metrics import MetricWriter, Progress, say
from nsn_jax.restore import restore_dense_twin
from nsn_jax.tasks import Task, config_task
from nsn_jax.train_step import (
  config_train_step,
  create_train_state,
  join_checkpoint,
  split_for_checkpoint,
)
from nsn_jax.workdir import WorkdirLock


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, metrics_dir: str | None = None
) -> dict[str, float]:
  """Trains `config` in `workdir` (resuming from its checkpoint) and returns final eval metrics.

  Writes workdir/checkpoints (orbax; local or gs://) and metrics_dir/metrics.jsonl and
  metrics_dir/tensorboard (metrics_dir defaults to the workdir and must be local). The config
  is validated before any data or weights are read; one run at a time holds the workdir.
  Raises StoppedEarly after saving when a stop was requested (SIGTERM, Ctrl-C).
  """
  metrics_dir = metrics_dir or workdir
  if "://" in metrics_dir:
    raise config_lib.ConfigError(
      "--metrics_dir",
      metrics_dir,
      "a local directory (checkpoints may still go to a gs:// workdir)",
      "metrics are local files",
    )
  config_lib.validate(config, jax.device_count())
  check_model_fits(config)
  # A cluster: every host runs the same config and sees the workdir process 0 writes.
  distributed.check_same("config", config.to_json_best_effort(sort_keys=True))
  distributed.check_shared(workdir)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # only process 0 writes metrics and decides quarantine
      local = (os.path.realpath(d) for d in (workdir, metrics_dir) if "://" not in d)
      for directory in dict.fromkeys(local):
        stack.enter_context(WorkdirLock(directory))
    distributed.barrier("locked")  # a refused lock stops every host now, not after loading
    # ----- Mesh, then input: the rows of each global batch this process's devices hold
    # (replays on resume).
    mesh = sharding.make_mesh(config.mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    rows = sharding.process_rows(batch_sharding, config.train.batch_size)
    task, batches, eval_arrays = _input(config)
    train_batches = batches(rows)

    # ----- Model (pretrained + surgery, or from scratch), method, and the sharded state.
    # Calibration reads whole global batches, so every process computes the same surgery.
    pretrained_model, method = model_and_method(config, task, lambda: batches(None), mesh)
    if line := method.start_line():
      say(line)
    distributed.barrier("setup")  # a host that failed to read its data or weights is named
    graphdef, state, state_sharding = create_train_state(config, mesh, pretrained_model)
    model = nnx.merge(graphdef, state).model

    # ----- Resume order: the workdir's newest good checkpoint (bad ones are moved aside to
    # workdir/quarantine), else from scratch (or the pretrained weights just loaded).
    checkpoints = Checkpoints(f"{workdir}/checkpoints", config.train.max_to_keep, writable=True)
    stack.callback(checkpoints.close)
    start_step = _resume(checkpoints, state, method)

    # ----- The update step: jitted once, state donated, shardings bound here.
    extra, extra_sharding = method.extra(mesh, config)
    step_fn = config_train_step(
      config, graphdef, method.loss, state_sharding, batch_sharding, extra_sharding
    )
    evaluator = RankEvaluator(nnx.graphdef(model), config.eval.batch_size, task, mesh)

    def evaluate(state) -> dict[str, float]:
      return {
        f"eval/{name}/{k}": v
        for name, rank in method.eval_points().items()
        for k, v in evaluator(state["model"], eval_arrays, rank).items()
        if k != "latency_s"
      }

    # A bucket workdir also gets the metrics (workdir/metrics), copied at every checkpoint.
    mirror = f"{workdir}/metrics" if "://" in workdir else None
    writer = MetricWriter(metrics_dir, start_step, mirror_to=mirror)
    stack.enter_context(contextlib.closing(writer))

    def save(step: int, state) -> None:
      checkpoints.save(
        step, *split_for_checkpoint(state), checkpoint_metadata(config, model, method, step)
      )
      writer.mirror()

    feed = functools.partial(sharding.global_batch, batch_sharding, config.train.batch_size, rows)
    inputs = (step_fn, pipeline.iterate(train_batches, start_step), feed, extra)
    return _loop(config, method, state, start_step, inputs, evaluate, save, writer)


def _input(config) -> tuple[Task, Callable[[np.ndarray | None], Any], dict]:
  """(task, rows → training batches by step holding those rows of each global batch (None:
  all), the eval split's arrays)."""
  task, encoder = config_task(config), text_encoder(config)

  def batches(rows: np.ndarray | None):
    return pipeline.train_batches(config.data, config.train.batch_size, config.seed, rows, encoder)

  return task, batches, pipeline.load_split(config.data, config.data.eval_split, encoder)


def model_and_method(
  config, task: Task, global_batches, mesh: Mesh
) -> tuple[nnx.Module | None, Method]:
  """(pretrained model after surgery, or None for a model trained from scratch; the method).

  A pretrained family loads from its file straight into `mesh`'s layout, or starts from
  `model.init_from`'s fine-tuned dense twin;
  the MLP from scratch, or from its trained dense twin's SVD (`model.init_from`).
  FlexRank (flexrank.budgets): nested profiles searched on the calibration batches; with
  objective flexrank_distill the dense model before surgery is the frozen teacher.
  """
  if config.model.name not in config_lib.SURGERY:  # from scratch, or a dense twin's SVD
    dense = restore_dense_twin(config, mesh)
    model = None if dense is None else nsn_from_dense(config, dense)
    return model, build_method(config, task, config.model.max_rank)
  dense, model, calibration = build_pretrained(
    config,
    seed=config.seed,
    calibrate=_calibration(config, task, global_batches, mesh),
    dense=restore_dense_twin(config, mesh),
    mesh=mesh,
  )
  found = []
  if config.flexrank.budgets:
    found = profiles.search_profiles(
      model,
      dense,
      calibration,
      config.flexrank.budgets,
      config.data.seq_len,
      config.flexrank.budget_unit,
    )
  teacher = dense if config.objective.name == config_lib.DISTILL else None
  return model, build_method(config, task, config.model.max_rank, found, teacher)


def _calibration(config, task: Task, global_batches, mesh: Mesh):
  """For `surgery.init=activation_aware` or FlexRank's profile search (`flexrank.budgets`):
  runs the dense model on the first `surgery.calibration_batches` global training batches
  (`global_batches()`, rank None, split over `mesh`'s batch axes beside the sharded weights),
  eagerly, so each chosen layer's inputs can be recorded. None otherwise."""
  if config.surgery.init != "activation_aware" and not config.flexrank.budgets:
    return None
  split = sharding.batch_sharding(mesh)

  def calibrate(model):
    batches = global_batches()
    for step in range(config.surgery.calibration_batches):
      batch = {k: sharding.place(np.asarray(v), split) for k, v in batches[step].items()}
      task.logits(model, batch, None)

  return calibrate


def _resume(checkpoints: Checkpoints, state: nnx.State, method: Method) -> int:
  """Restores the newest good checkpoint into `state` in place; returns its step (0: none)."""
  params, train = split_for_checkpoint(state)
  restored = checkpoints.restore(abstract_tree(params), abstract_tree(train))
  if restored is None:
    return 0
  step, params, train, metadata = restored
  method.check_resume(metadata, checkpoints.directory)
  nnx.replace_by_pure_dict(state, join_checkpoint(params, train))
  say(f"resumed from step {step} of {checkpoints.directory}")
  return step


def checkpoint_metadata(config, model: nnx.Module, method: Method, step: int) -> dict:
  """What a checkpoint says about itself; `restore_model` rebuilds the model from it."""
  return {
    "config": json.loads(config.to_json_best_effort()),
    "nsn_layers": {
      path: {"in_features": l.in_features, "out_features": l.out_features, "max_rank": l.max_rank}
      for path, l in nsn_layers(model).items()
    },
    "max_rank": None if config.model.dense else config.model.max_rank,
    "library_version": nsn_jax.__version__,
    "step": step,
    **method.metadata(),
  }


class StoppedEarly(Exception):
  """A run stopped on request (SIGTERM, Ctrl-C) after saving; re-running resumes it."""


class _StopFlag:
  """Set by SIGTERM (preemption) or a first Ctrl-C: the loop saves and stops. A second Ctrl-C
  interrupts at once.

  In a cluster, SIGTERM is left to JAX's preemption service: a notice reaching any one host
  makes every host stop at the same step (`reached_preemption_sync_point`), and saving is
  collective. Ctrl-C flags are compared across hosts every `log_every` steps.
  """

  def __init__(self):
    self.requested = False
    # Signal handlers can only be installed from the main thread; elsewhere (a notebook's
    # worker thread) the caller keeps its own handling.
    main = threading.current_thread() is threading.main_thread()
    signals = (signal.SIGINT,) if distributed.in_cluster() else (signal.SIGTERM, signal.SIGINT)
    self._previous = {sig: signal.signal(sig, self._handle) for sig in signals if main}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning(
      "%s: saving a checkpoint and stopping (Ctrl-C again to abort).", signal.Signals(signum).name
    )
    self.requested = True

  def agreed(self, step: int, every: int) -> bool:
    """Whether every process stops after `step` (call it at every step, from the first)."""
    if not distributed.in_cluster():
      return self.requested
    if multihost_utils.reached_preemption_sync_point(step):
      say(f"preemption notice: every process saves step {step} and stops")
      return True
    if step % every:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _loop(
  config, method: Method, state, start_step: int, inputs, evaluate, save, writer: MetricWriter
) -> dict[str, float]:
  """Steps start_step+1..train.steps; returns the final evaluation.

  Step t is dispatched before step t−1's metrics are fetched, so the host never stalls the
  device; the fetched `finite` flag stops a diverged run before anything non-finite is saved.
  """
  if start_step >= config.train.steps:  # already trained: evaluate, log nothing twice
    past = f", past train.steps={config.train.steps}" if start_step > config.train.steps else ""
    say(f"the checkpoint is at step {start_step}{past}: nothing to train, evaluating it")
    final = evaluate(state)
    if not any(k.startswith("eval/") for k in writer.logged(start_step)):  # a run cut short
      writer.write(start_step, final)
    return final
  step_fn, batches, feed, extra = inputs
  progress = Progress(config.train.steps, start_step)
  stop = _StopFlag()
  pending, saved_step = None, start_step

  def settle(force=False) -> None:
    """Fetches the pending step's metrics: refuses non-finite ones, logs on log steps."""
    nonlocal pending
    (done, step_inputs, metrics), pending = pending, None
    metrics = jax.device_get(metrics)
    if not metrics["finite"]:
      last = f"is step {saved_step}" if saved_step else "does not exist yet"
      raise FloatingPointError(
        f"step {done}: the loss or the parameters are NaN/inf; the last checkpoint {last} and "
        "nothing later was saved. Lower optimizer.learning_rate or raise "
        "optimizer.warmup_steps, then re-run (it resumes from that checkpoint)."
      )
    if force or done % config.train.log_every == 0:
      scalars, fields = method.log(done, step_inputs, metrics)
      writer.write(done, scalars)
      progress.report(done, **fields)

  try:
    for step in range(start_step + 1, config.train.steps + 1):
      batch = feed(next(batches))
      step_inputs = method.step_inputs(step)
      state, metrics = step_fn(state, batch, jnp.asarray(step_inputs), extra)
      if pending is not None:
        settle()
      pending = (step, step_inputs, metrics)
      stopping = stop.agreed(step, config.train.log_every)
      if stopping or step % config.train.checkpoint_every == 0 or step == config.train.steps:
        settle(force=stopping or step == config.train.steps)  # check it before it is saved
        save(step, state)
        saved_step = step
      if stopping and step < config.train.steps:
        raise StoppedEarly(f"stopped at step {step} on request, saved; re-run to resume.")
      if step % config.eval.every == 0 and step != config.train.steps:
        if pending is not None:
          settle()  # a NaN here is reported as divergence, naming the last checkpoint
        writer.write(step, evaluate(state))
    final = evaluate(state)
    writer.write(config.train.steps, final)
    return final
  finally:
    stop.restore()
