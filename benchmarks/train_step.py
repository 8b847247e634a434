"""One optimizer step of the NSN MLP, four ways, for k ranks per step — each the library's own
step (`nsn_jax.train_step.make_train_step` driving a `nsn_jax.methods.MultiRank`), as train.py
runs it:

  vmap_masked    multi_rank_loss vmaps the masked path at full width R over a rank vector;
  loop_static    the fixed ranks as static slices, one forward pass each, summed into one loss
                 with the same uncertainty weighting (`train.multi_rank=loop_static`);
  bucketed       the fixed ranks grouped by `BucketPlan.auto`, each bucket vmapped over its
                 masked ranks at the static width of its largest (`train.multi_rank=bucketed`);
  single_static  plain cross-entropy at the single static rank R (objective anchor_only): the
                 cost a multi-rank step is compared to.

Two models: `mlp`, the MLP of configs/default.py (R = 64), where the masked vmap runs every rank
at R but R is small, and `mlp_wide` (hidden 2048, 2048, R = 1024), where running all k ranks at
R costs k full-rank passes while the static loop pays R + R/2 + ... (1.875 R at k = 4). Both run
the anchor and its halvings (k = 1, 2, 4) at the config's batch; `mlp` also runs the config's own
rank set (the demo's 11 ranks; smoke's 3 at size tiny) at each of `DEMO_BATCHES`.
The state comes from `create_train_state` on a one-device mesh, since the suite times one device.

Run as a module (`python -m benchmarks.train_step`), this is the JAX worker of the comparison with
PyTorch (`benchmarks.torch_ref`): the demo MLP's step on its own rank set, built by
`build_method` as train.py builds it, per strategy and batch, answering requests on stdin
(`benchmarks.line_worker`) so that it runs in its own pinned process, alternately with PyTorch.
"""

from __future__ import annotations

import copy
import functools
import os
import pathlib
import time
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import line_worker
from benchmarks.common import Column, SuiteResult, mlp_config, summary_line, wide_mlp_config
from benchmarks.timing import Policy, time_fn
from nsn_jax import config as config_lib
from nsn_jax import host_memory, sharding
from nsn_jax.methods import MultiRank, build_method
from nsn_jax.objective import Objective
from nsn_jax.ranks import BucketPlan, FixedRanks
from nsn_jax.tasks import get_task
from nsn_jax.train_step import config_train_step, create_train_state, make_train_step, trainable

NUM_RANKS = (1, 2, 4)
DEMO_BATCHES = {"tiny": (32,), "full": (128, 1024)}
IMAGES = get_task("image_classification")

MODELS = {"mlp": mlp_config, "mlp_wide": wide_mlp_config}
# Size tiny (the smoke test) times the demo MLP only: mlp_wide runs the same code on wider shapes.
SIZE_MODELS = {"tiny": ("mlp",), "full": tuple(MODELS)}
MULTI = ("vmap_masked", "loop_static", "bucketed")

COLUMNS = (
  Column("model", "model"),
  Column("strategy", "strategy"),
  Column("batch", "batch"),
  Column("k", "k"),
  Column("ranks", "ranks"),
  Column("buckets", "buckets"),
  Column("step_s", "ms/step", ".3f", 1e3),
  Column("step_min_s", "min ms", ".3f", 1e3),
  Column("steps_per_s", "steps/s", ".1f"),
  Column("program_bytes", "mem MiB", ".2f", 2.0**-20),
  Column("program_temp_bytes", "temp MiB", ".2f", 2.0**-20),
  Column("vs_single", "step/single", ".3f"),
)


def step_ranks(max_rank: int, k: int) -> tuple[int, ...]:
  """The anchor R and k − 1 variants, halving: (64,), (64, 32), (64, 32, 16, 8)."""
  return tuple(max_rank // 2**i for i in range(k))


def _cases(model_name: str, config, size: str) -> list[tuple[tuple[int, ...], int]]:
  """(ranks, batch) timed for a model: the halvings at the config's batch, and for `mlp` the
  config's rank set at each of `DEMO_BATCHES`."""
  cases = [(step_ranks(config.model.max_rank, k), config.train.batch_size) for k in NUM_RANKS]
  if model_name == "mlp":
    cases += [(config_lib.fixed_ranks(config), batch) for batch in DEMO_BATCHES[size]]
  return cases


def _methods(ranks: tuple[int, ...], max_rank: int) -> list[tuple[str, MultiRank]]:
  """(strategy, method) for each strategy on a fixed rank set."""
  source, objective = FixedRanks(ranks, max_rank), Objective("uncertainty")
  plans = {
    "vmap_masked": None,
    "loop_static": BucketPlan.singletons(ranks),
    "bucketed": BucketPlan.auto(ranks),
  }
  methods = [(name, MultiRank(IMAGES, (), objective, source, plan)) for name, plan in plans.items()]
  if len(ranks) == 1:
    single = MultiRank(IMAGES, (), Objective("anchor"), source, plans["loop_static"])
    methods.append(("single_static", single))
  return methods


def memory_used(compiled) -> dict:
  """Memory of a step that has run, in bytes.

  program_bytes, from the compiled program: arguments + outputs not aliased to the donated
  arguments + temporaries, an upper bound on what one step holds live. (Its
  peak_memory_in_bytes is no help on CPU: there it barely exceeds the argument size.)
  device_peak_bytes: the device's own high-water mark where it keeps one (GPU, TPU), which is
  process-wide and never decreases; None on CPU. `memory_source` says which to read.
  """
  stats = jax.devices()[0].memory_stats()
  program = compiled.memory_analysis()
  device_peak = stats.get("peak_bytes_in_use") if stats else None
  return {
    "program_bytes": (
      program.argument_size_in_bytes
      + program.output_size_in_bytes
      - program.alias_size_in_bytes
      + program.temp_size_in_bytes
    ),
    "program_temp_bytes": program.temp_size_in_bytes,
    "device_peak_bytes": device_peak,
    "memory_source": (
      "device.memory_stats()['peak_bytes_in_use'] (process high-water mark)"
      if device_peak is not None
      else "compiled.memory_analysis(): argument + output - alias + temp"
    ),
  }


def host_batch(config, batch_size: int) -> dict[str, np.ndarray]:
  """Random images and labels made on the host with numpy: no random-number programs to
  compile, and the very arrays the PyTorch reference reads."""
  rng = np.random.default_rng(1)
  return {
    "image": rng.random((batch_size, *config.data.image_shape), np.float32),
    "label": rng.integers(0, config.data.num_classes, batch_size, dtype=np.int32),
  }


class Stepper:
  """One strategy's jitted step on its own copy of the initial state (the step donates it),
  compiled once; each call runs one step to a ready result."""

  def __init__(self, step, initial_state, batch: dict, ranks: jax.Array):
    self.step, self.batch, self.ranks = step, batch, ranks
    self.state = jax.tree.map(jnp.copy, initial_state)
    start = time.perf_counter()
    self.compiled = step.lower(self.state, batch, ranks, None).compile()  # the calls reuse it
    self.compile_s = time.perf_counter() - start

  def __call__(self) -> None:
    self.state, metrics = self.step(self.state, self.batch, self.ranks, None)
    jax.block_until_ready((self.state, metrics))


def _model_rows(model_name: str, size: str, policy: Policy) -> list[dict]:
  config = MODELS[model_name](size)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, initial_state, state_sharding = create_train_state(config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  max_rank = config.model.max_rank

  rows = []
  for ranks, batch_size in _cases(model_name, config, size):
    batch = jax.device_put(host_batch(config, batch_size), batch_sharding)
    ranks_array = jnp.asarray(ranks, jnp.int32)
    for strategy, method in _methods(ranks, max_rank):
      step = make_train_step(
        graphdef, method.loss, trainable(config), state_sharding, batch_sharding
      )
      stepper = Stepper(step, initial_state, batch, ranks_array)
      timing = time_fn(stepper, policy)
      rows.append(
        {
          "model": model_name,
          "hidden": list(config.model.hidden),
          "max_rank": max_rank,
          "strategy": strategy,
          "k": len(ranks),
          "ranks": list(ranks),
          "buckets": str(method.plan) if strategy == "bucketed" else None,
          "batch": batch_size,
          "step_s": timing.median_s,
          "step_min_s": timing.min_s,
          "steps_per_s": 1.0 / timing.median_s,
          "calls_per_sample": timing.number,
          **memory_used(stepper.compiled),
        }
      )
  single = next(row for row in rows if row["strategy"] == "single_static")
  for row in rows:
    row["vs_single"] = row["step_s"] / single["step_s"] if row["batch"] == single["batch"] else None
  return rows


def _summary(rows: list[dict], size: str) -> list[dict]:
  """Per model: the two-rank / single-rank step per strategy, and each static strategy's step /
  vmap_masked's for every multi-rank set and batch (< 1: cheaper than the masked vmap)."""

  def find(model_name, strategy, ranks, batch):
    return next(
      row
      for row in rows
      if (row["model"], row["strategy"], row["ranks"], row["batch"])
      == (model_name, strategy, ranks, batch)
    )

  lines = []
  for model_name in dict.fromkeys(row["model"] for row in rows):
    masked = [r for r in rows if (r["model"], r["strategy"]) == (model_name, "vmap_masked")]
    two = next(row for row in masked if row["k"] == 2)
    lines += [
      summary_line(
        f"{model_name} {strategy}: two-rank step / single-rank step",
        find(model_name, strategy, two["ranks"], two["batch"])["vs_single"],
        judged=size == "full",
        at_most=2.2,
      )
      for strategy in MULTI
    ]
    lines += [
      summary_line(
        f"{model_name} k={row['k']} batch {row['batch']}: {strategy} step / vmap_masked step",
        find(model_name, strategy, row["ranks"], row["batch"])["step_s"] / row["step_s"],
      )
      for row in masked
      if row["k"] > 1
      for strategy in MULTI[1:]
    ]
  return lines


def run(size: str, policy: Policy) -> SuiteResult:
  rows = [row for name in SIZE_MODELS[size] for row in _model_rows(name, size, policy)]
  notes = [
    f"memory: {rows[0]['memory_source']}",
    "objective: uncertainty weighting for every multi-rank strategy; optimizer: the "
    "config's AdamW with its warm-up/cosine schedule",
    "buckets: the plan of BucketPlan.auto (each bucket runs at the width of its first rank)",
  ]
  return SuiteResult(rows, _summary(rows, size), notes, COLUMNS)


# The JAX worker of the comparison with PyTorch (benchmarks.torch_ref): `python -m
# benchmarks.train_step`, one per thread setting, pinned by its parent.
_SERVED: dict[tuple[str, int], Stepper] = {}  # (strategy, batch) → its step
KINK_MARGIN = 1e-5  # |pre-activation| in float64 below which the check batch drops an example


def demo_strategies(config) -> tuple[str, ...]:
  """The strategies timed against PyTorch: the default (what `train.multi_rank=auto` picks for
  `config`) first, then vmap_masked and loop_static."""
  return tuple(dict.fromkeys((config_lib.multi_rank(config), "vmap_masked", "loop_static")))


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """A nested dict of arrays as {"model/hidden/0/a": array, ...}: the names both sides of the
  PyTorch comparison use for parameters and gradients."""
  return {
    "/".join(str(getattr(key, "key", key)) for key in path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _loss_and_grads(graphdef, method, wrt, mesh):
  """jit(state, batch, ranks → (the method's loss, its gradients as a pure dict)): the step's
  value_and_grad without the optimizer update."""

  @sharding.with_mesh(mesh)
  def run(state, batch, ranks):
    (loss, _), grads = nnx.value_and_grad(
      lambda s: method.loss(s, batch, ranks, None), argnums=nnx.DiffState(0, wrt), has_aux=True
    )(nnx.merge(graphdef, state))
    return loss, nnx.to_pure_dict(grads)

  return jax.jit(run)


class _Built(NamedTuple):
  """What every strategy's step at one batch is built from (`serve_setup`)."""

  graphdef: Any
  initial_state: Any
  state_sharding: Any
  batch_sharding: Any
  batch: dict  # on device: what the step is timed on
  check_batch: dict  # on device: what the loss and gradients are checked on (`check_batch`)
  ranks: jax.Array


def check_batch(parameters: dict[str, np.ndarray], batch: dict, ranks) -> tuple[dict, int]:
  """(`batch` with each example that comes within KINK_MARGIN of a ReLU kink replaced by an
  example that does not, how many were replaced); the MLP's pre-activations at every rank in
  float64 from `parameters` (`flat_arrays` names).

  Where a pre-activation is ~1e-8 from 0, float32 rounding decides on which side of ReLU's kink
  it falls, differently in each implementation: that example's gradient then changes by a
  whole unit's contribution, ~1e-4 of the gradient's norm at batch 1024, though both sides
  compute the same maths. Away from the kinks the sides agree to ~1e-7.
  """
  x = batch["image"].reshape(len(batch["image"]), -1).astype(np.float64)
  margin = np.full(len(x), np.inf)
  layers = sorted({key.rsplit("/", 1)[0] for key in parameters if key.startswith("model/hidden/")})
  for rank in ranks:
    h = x
    for layer in layers:
      a, b, bias = (parameters[f"{layer}/{name}"].astype(np.float64) for name in ("a", "b", "bias"))
      pre = h @ a[:, :rank] @ b[:rank] + bias
      margin = np.minimum(margin, np.abs(pre).min(axis=1))
      h = np.maximum(pre, 0.0)
  rows, clear = np.arange(len(x)), np.flatnonzero(margin > KINK_MARGIN)
  replaced = np.flatnonzero(margin <= KINK_MARGIN)
  if not len(clear):
    raise ValueError(f"every example comes within {KINK_MARGIN} of a ReLU kink.")
  rows[replaced] = clear[np.arange(len(replaced)) % len(clear)]
  return {key: value[rows] for key, value in batch.items()}, len(replaced)


def _serve_strategy(config, built: _Built, strategy: str, batch_size: int, directory) -> dict:
  """Builds, compiles and checks one strategy's step at one batch. Writes its loss's gradients
  at the initial state on the check batch to DIRECTORY/grads_jax:STRATEGY_BATCH.npz."""
  strategy_config = copy.deepcopy(config)
  strategy_config.train.multi_rank = strategy
  method = build_method(strategy_config, IMAGES, config.model.max_rank)  # as train.py builds it
  step = config_train_step(
    strategy_config, built.graphdef, method.loss, built.state_sharding, built.batch_sharding
  )
  check = _loss_and_grads(built.graphdef, method, trainable(config), built.batch_sharding.mesh)
  loss, grads = check(built.initial_state, built.check_batch, built.ranks)
  np.savez(pathlib.Path(directory) / f"grads_jax:{strategy}_{batch_size}.npz", **flat_arrays(grads))
  stepper = Stepper(step, built.initial_state, built.batch, built.ranks)
  _SERVED[strategy, batch_size] = stepper
  return {
    "name": f"jax:{strategy}",
    "batch": batch_size,
    "default": strategy == config_lib.multi_rank(config),
    "buckets": str(method.plan) if method.plan else None,
    "loss": float(loss),
    "compile_s": stepper.compile_s,
    **memory_used(stepper.compiled),
  }


def serve_setup(
  size: str, batches: list[int], directory: str, keeps_freed_memory: bool | None = None
) -> dict:
  """Builds every strategy's step at every batch from the demo config (`mlp_config(size)`);
  writes what PyTorch starts from: the initial parameters (init.npz), the batches
  (batch_B.npz) and the check batches (check_B.npz). `keeps_freed_memory`: what the
  worker's start got from `host_memory.keep_freed_memory` (recorded in the reply)."""
  config = mlp_config(size)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, initial_state, state_sharding = create_train_state(config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  parameters = flat_arrays(
    {k: v for k, v in nnx.to_pure_dict(initial_state).items() if k != "optimizer"}
  )
  np.savez(pathlib.Path(directory) / "init.npz", **parameters)
  ranks = config_lib.fixed_ranks(config)
  contenders, replaced = [], {}
  for batch_size in batches:
    host = host_batch(config, batch_size)
    checked, replaced[batch_size] = check_batch(parameters, host, ranks)
    for name, arrays in (("batch", host), ("check", checked)):
      np.savez(pathlib.Path(directory) / f"{name}_{batch_size}.npz", **arrays)
    on_device = [jax.device_put(arrays, batch_sharding) for arrays in (host, checked)]
    built = _Built(
      graphdef,
      initial_state,
      state_sharding,
      batch_sharding,
      *on_device,
      ranks=jnp.asarray(ranks, jnp.int32),
    )
    contenders += [
      _serve_strategy(config, built, strategy, batch_size, directory)
      for strategy in demo_strategies(config)
    ]
  return {
    "contenders": contenders,
    "check_rows_replaced": replaced,
    "jax": jax.__version__,
    "cpus": sorted(os.sched_getaffinity(0)),
    "xla_flags": os.environ.get("XLA_FLAGS"),
    "keeps_freed_memory": keeps_freed_memory,
    "os_threads": line_worker.process_threads(),
  }


def serve_time(name: str, batch: int, policy: dict) -> dict:
  """Times the step `name` ("jax:STRATEGY") at `batch` that `serve_setup` built."""
  return line_worker.timed(_SERVED[name.removeprefix("jax:"), batch], policy)


if __name__ == "__main__":
  # As train.py's launch does (--keep_host_memory): before JAX's CPU client starts, or it has
  # no effect on the step.
  setup = functools.partial(serve_setup, keeps_freed_memory=host_memory.keep_freed_memory())
  line_worker.serve({"setup": setup, "time": serve_time})
