"""nsn_jax against a plain PyTorch eager reference of the same layer and MLP, same shapes and ranks.

PyTorch lives in its own venv (.venv-torch, requirements/torch-reference.txt), never the
project's; benchmarks.torch_worker runs there as a subprocess and returns JSON. The JAX side of
every ratio is the layer / model / train suites' rows from the same invocation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess

from benchmarks import layer, model, train_step
from benchmarks.common import Column, SuiteResult, mlp_config, summary_line
from benchmarks.timing import Policy

REPO = pathlib.Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv-torch" / "bin" / "python"
SETUP = ("python3 -m venv .venv-torch && "
         ".venv-torch/bin/pip install -r requirements/torch-reference.txt")
NEEDS = ("layer", "model", "train")  # the JAX suites whose rows the ratios use

COLUMNS = (
    Column("what", "what"), Column("batch", "batch"), Column("rank", "rank"), Column("k", "k"),
    Column("jax_strategy", "jax step"), Column("torch_s", "torch ms", ".3f", 1e3),
    Column("jax_s", "jax ms", ".3f", 1e3), Column("torch_over_jax", "torch/jax", ".2f"),
)


def available() -> bool:
  return PYTHON.exists()


def missing_message() -> str:
  return (f"torch suite skipped: no PyTorch venv at {PYTHON}. Create it from the repo root:\n"
          f"  {SETUP}")


def spec(size: str, policy: Policy) -> dict:
  """What the worker measures: the JAX suites' grids, so both sides time the same shapes."""
  grid = layer.GRIDS[size]
  config = mlp_config(size)
  max_rank = config.model.max_rank
  return {
      "policy": dataclasses.asdict(policy),
      "layer": {"d": grid.d, "max_rank": grid.max_rank, "ranks": list(grid.ranks),
                "batches": list(grid.batches)},
      "mlp": {"input_dim": math.prod(config.data.image_shape), "hidden": list(config.model.hidden),
              "num_classes": config.data.num_classes, "max_rank": max_rank,
              "image_shape": list(config.data.image_shape),
              "ranks": list(model.rank_grid(max_rank)), "batches": list(model.BATCHES[size])},
      "train": {"batch": config.train.batch_size,
                "rank_sets": [list(train_step.step_ranks(max_rank, k))
                              for k in train_step.NUM_RANKS],
                "learning_rate": config.optimizer.learning_rate,
                "weight_decay": config.optimizer.weight_decay},
  }


def run(size: str, policy: Policy, jax_results: dict[str, SuiteResult]) -> SuiteResult:
  if not available():
    return SuiteResult([], [], [missing_message()], COLUMNS, skipped=True)
  done = subprocess.run([str(PYTHON), "-m", "benchmarks.torch_worker"], cwd=REPO,
                        input=json.dumps(spec(size, policy)), capture_output=True, text=True,
                        check=False)
  if done.returncode:
    raise RuntimeError(f"torch worker failed:\n{done.stderr}")
  reference = json.loads(done.stdout.strip().splitlines()[-1])

  jax_latency = {
      ("layer", row["batch"], row["rank"]): row["latency_s"]
      for row in jax_results["layer"].rows if row["kind"] == "nsn"} | {
      ("mlp", row["batch"], row["rank"]): row["latency_s"]
      for row in jax_results["model"].rows if row["kind"] == "nsn"}
  jax_step = {(row["strategy"], row["k"]): row["step_s"] for row in jax_results["train"].rows}
  rows = []
  for row in reference["rows"]:
    if row["what"] == "train":
      rows += [{"what": "train", "batch": row["batch"], "rank": None, "k": row["k"],
                "jax_strategy": strategy, "torch_s": row["step_s"],
                "jax_s": jax_step[strategy, row["k"]],
                "torch_over_jax": row["step_s"] / jax_step[strategy, row["k"]]}
               for strategy in ("vmap_masked", "loop_static")]
    else:
      jax_s = jax_latency[row["what"], row["batch"], row["rank"]]
      rows.append({"what": row["what"], "batch": row["batch"], "rank": row["rank"], "k": None,
                   "jax_strategy": "static", "torch_s": row["latency_s"], "jax_s": jax_s,
                   "torch_over_jax": row["latency_s"] / jax_s})

  def slowest(what, strategy=None):
    return min(row["torch_over_jax"] for row in rows
               if row["what"] == what and strategy in (None, row["jax_strategy"]))

  judged = size == "full"
  summary = [
      summary_line("MLP multi-rank train step, torch / jax (vmap_masked), worst k",
                   slowest("train", "vmap_masked"), judged=judged, at_least=1.5),
      summary_line("MLP multi-rank train step, torch / jax (loop_static), worst k",
                   slowest("train", "loop_static")),
      summary_line("MLP per-rank inference, torch / jax, worst rank and batch", slowest("mlp"),
                   judged=judged, at_least=1.0),
      summary_line("NSN layer per-rank inference, torch / jax, worst rank and batch",
                   slowest("layer")),
  ]
  notes = [f"torch {reference['torch_version']} eager, {reference['torch_threads']} threads; "
           "torch/jax > 1 means nsn_jax is faster; the torch train step loops over ranks "
           "(AdamW at the config's peak learning rate, no schedule)"]
  return SuiteResult(rows, summary, notes, COLUMNS)
