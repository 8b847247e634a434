"""nsn_jax against a plain PyTorch eager reference of the same layer and MLP, same shapes and ranks.

PyTorch lives in its own venv (.venv-torch, requirements/torch-reference.txt), never the
project's; benchmarks.torch_worker runs there as a subprocess and returns JSON. The JAX side of
every ratio is the layer / model / train suites' rows from the same invocation.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import layer, model, train_step
from benchmarks.common import (
  REPO,
  Column,
  SuiteResult,
  mlp_config,
  run_json_worker,
  summary_line,
  time_jax,
)
from benchmarks.timing import Policy

PYTHON = REPO / ".venv-torch" / "bin" / "python"
SETUP = (
  "python3 -m venv .venv-torch && .venv-torch/bin/pip install -r requirements/torch-reference.txt"
)
NEEDS = ("layer", "model", "train")  # the JAX suites whose rows the ratios use

COLUMNS = (
  Column("what", "what"),
  Column("batch", "batch"),
  Column("rank", "rank"),
  Column("k", "k"),
  Column("jax_strategy", "jax step"),
  Column("torch_s", "torch ms", ".3f", 1e3),
  Column("jax_s", "jax ms", ".3f", 1e3),
  Column("torch_over_jax", "torch/jax", ".2f"),
)


def available() -> bool:
  return PYTHON.exists()


def missing_message() -> str:
  return (
    f"torch suite skipped: no PyTorch venv at {PYTHON}. Create it from the repo root:\n  {SETUP}"
  )


def matmul_ranks(max_rank: int) -> list[int]:
  """The ranks whose first-layer matmul both sides also time alone: R/4 and up, where the MLP's
  per-rank inference was slowest against PyTorch."""
  return [r for r in model.rank_grid(max_rank) if r >= max_rank // 4]


def _jax_matmul_rows(mlp_spec: dict, policy: Policy) -> list[dict]:
  """The MLP's first factor matmul x (batch, d_in) @ a_r (d_in, r) alone, jitted, on contiguous
  operands: what XLA's CPU dot achieves on the shape PyTorch hands to its BLAS."""
  matmul = jax.jit(jnp.matmul)
  rng = np.random.default_rng(2)
  rows = []
  for batch in mlp_spec["batches"]:
    x = jax.device_put(rng.random((batch, mlp_spec["input_dim"]), np.float32))
    for rank in mlp_spec["matmul_ranks"]:
      a = jax.device_put(rng.standard_normal((mlp_spec["input_dim"], rank), np.float32))
      rows.append(
        {"batch": batch, "rank": rank, "latency_s": time_jax(matmul, x, a, policy=policy).median_s}
      )
  return rows


def spec(size: str, policy: Policy) -> dict:
  """What the worker measures: the JAX suites' grids, so both sides time the same shapes."""
  grid = layer.GRIDS[size]
  config = mlp_config(size)
  max_rank = config.model.max_rank
  return {
    "policy": dataclasses.asdict(policy),
    "layer": {
      "d": grid.d,
      "max_rank": grid.max_rank,
      "ranks": list(grid.ranks),
      "batches": list(grid.batches),
    },
    "mlp": {
      "input_dim": math.prod(config.data.image_shape),
      "hidden": list(config.model.hidden),
      "num_classes": config.data.num_classes,
      "max_rank": max_rank,
      "image_shape": list(config.data.image_shape),
      "ranks": list(model.rank_grid(max_rank)),
      "batches": list(model.BATCHES[size]),
      "matmul_ranks": matmul_ranks(max_rank),
    },
    "train": {
      "batch": config.train.batch_size,
      "rank_sets": [list(train_step.step_ranks(max_rank, k)) for k in train_step.NUM_RANKS],
      "learning_rate": config.optimizer.learning_rate,
      "weight_decay": config.optimizer.weight_decay,
    },
  }


def run(size: str, policy: Policy, jax_results: dict[str, SuiteResult]) -> SuiteResult:
  if not available():
    return SuiteResult([], [], [missing_message()], COLUMNS, skipped=True)
  config = spec(size, policy)
  reference = run_json_worker(
    [str(PYTHON), "-m", "benchmarks.torch_worker"], input_text=json.dumps(config)
  )
  jax_matmul = {
    (row["batch"], row["rank"]): row["latency_s"] for row in _jax_matmul_rows(config["mlp"], policy)
  }

  model_rows = [row for row in jax_results["model"].rows if row["model"] == "mlp"]
  jax_latency = (
    {
      ("layer", "static", row["batch"], row["rank"]): row["latency_s"]
      for row in jax_results["layer"].rows
      if row["kind"] == "nsn"
    }
    | {
      ("mlp", "static", row["batch"], row["rank"]): row["latency_s"]
      for row in model_rows
      if row["kind"] == "nsn"
    }
    | {
      # The matmul policy deploys the MLP in the factorised form at every rank: the reference's
      # computation, on weights sliced once instead of per call.
      ("mlp", "deployed matmul", row["batch"], row["rank"]): row["latency_s"]
      for row in model_rows
      if row["kind"] == "deployed" and row["policy"] == "matmul"
    }
    | {
      ("mlp_matmul", "x @ a_r", batch, rank): latency
      for (batch, rank), latency in jax_matmul.items()
    }
  )
  jax_step = {
    (row["strategy"], row["k"], row["batch"]): row["step_s"]
    for row in jax_results["train"].rows
    if row["model"] == "mlp"
  }
  rows = []
  for row in reference["rows"]:
    if row["what"] == "train":
      rows += [
        {
          "what": "train",
          "batch": row["batch"],
          "rank": None,
          "k": row["k"],
          "jax_strategy": strategy,
          "torch_s": row["step_s"],
          "jax_s": jax_step[strategy, row["k"], row["batch"]],
          "torch_over_jax": row["step_s"] / jax_step[strategy, row["k"], row["batch"]],
        }
        for strategy in ("vmap_masked", "loop_static")
      ]
    else:
      rows += [
        {
          "what": row["what"],
          "batch": row["batch"],
          "rank": row["rank"],
          "k": None,
          "jax_strategy": how,
          "torch_s": row["latency_s"],
          "jax_s": jax_s,
          "torch_over_jax": row["latency_s"] / jax_s,
        }
        for (what, how, batch, rank), jax_s in jax_latency.items()
        if (what, batch, rank) == (row["what"], row["batch"], row["rank"])
      ]

  def slowest(what, strategy=None):
    return min(
      row["torch_over_jax"]
      for row in rows
      if row["what"] == what and strategy in (None, row["jax_strategy"])
    )

  judged = size == "full"
  summary = [
    summary_line(
      "MLP multi-rank train step, torch / jax (vmap_masked), worst k",
      slowest("train", "vmap_masked"),
      judged=judged,
      at_least=1.5,
    ),
    summary_line(
      "MLP multi-rank train step, torch / jax (loop_static), worst k",
      slowest("train", "loop_static"),
    ),
    summary_line(
      "MLP per-rank inference, torch / jax (static slices), worst rank and batch",
      slowest("mlp", "static"),
      judged=judged,
      at_least=1.0,
    ),
    summary_line(
      "MLP per-rank inference, torch / jax (deployed, matmul policy), worst rank and batch",
      slowest("mlp", "deployed matmul"),
      judged=judged,
      at_least=1.0,
    ),
    summary_line(
      "MLP first-layer matmul x @ a_r alone, torch / jax, worst rank and batch",
      slowest("mlp_matmul"),
    ),
    summary_line(
      "NSN layer per-rank inference, torch / jax, worst rank and batch", slowest("layer")
    ),
  ]
  notes = [
    f"torch {reference['torch_version']} eager, {reference['torch_threads']} threads; "
    "torch/jax > 1 means nsn_jax is faster; the torch train step loops over ranks "
    "(AdamW at the config's peak learning rate, no schedule)"
  ]
  return SuiteResult(rows, summary, notes, COLUMNS)
