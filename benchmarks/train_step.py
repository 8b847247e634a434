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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import Column, SuiteResult, mlp_config, summary_line, wide_mlp_config
from benchmarks.timing import Policy, time_fn
from nsn_jax import config as config_lib
from nsn_jax import sharding
from nsn_jax.methods import MultiRank
from nsn_jax.objective import Objective
from nsn_jax.ranks import BucketPlan, FixedRanks
from nsn_jax.tasks import get_task
from nsn_jax.train_step import create_train_state, make_train_step, trainable

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


def _batch(config, batch_size: int, batch_sharding) -> dict:
  """Random images and labels made on the host: no random-number programs to compile."""
  rng = np.random.default_rng(1)
  return jax.device_put(
    {
      "image": rng.random((batch_size, *config.data.image_shape), np.float32),
      "label": rng.integers(0, config.data.num_classes, batch_size, dtype=np.int32),
    },
    batch_sharding,
  )


def _model_rows(model_name: str, size: str, policy: Policy) -> list[dict]:
  config = MODELS[model_name](size)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  graphdef, initial_state, state_sharding = create_train_state(config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  max_rank = config.model.max_rank

  rows = []
  for ranks, batch_size in _cases(model_name, config, size):
    batch = _batch(config, batch_size, batch_sharding)
    ranks_array = jnp.asarray(ranks, jnp.int32)
    for strategy, method in _methods(ranks, max_rank):
      step = make_train_step(
        graphdef, method.loss, trainable(config), state_sharding, batch_sharding
      )
      # The step donates its state: give each strategy its own copy of the initial state.
      state = jax.tree.map(jnp.copy, initial_state)
      compiled = step.lower(state, batch, ranks_array, None).compile()  # the calls reuse it

      def one_step():
        nonlocal state
        state, metrics = step(state, batch, ranks_array, None)
        jax.block_until_ready((state, metrics))

      timing = time_fn(one_step, policy)
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
          **memory_used(compiled),
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
