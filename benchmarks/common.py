"""What the suites share: the result record and summary lines, the MLP config, the static-rank
eval program, XLA's FLOP count, JAX latency."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shlex
import subprocess
from typing import Any, NamedTuple

from flax import nnx
import jax
import ml_collections

from benchmarks.timing import Policy, Timing, time_fn
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]  # where workers run


class Column(NamedTuple):
  """A table column: row[key] × scale, formatted with `fmt` under `header`."""

  key: str
  header: str
  fmt: str = ""
  scale: float = 1.0


def latency_columns(flops_fmt: str) -> tuple[Column, ...]:
  """The columns every latency table ends with: median and min latency, achieved FLOP/s,
  analytic and XLA FLOPs, latency relative to the dense model."""
  return (
    Column("latency_s", "ms", ".3f", 1e3),
    Column("latency_min_s", "min ms", ".3f", 1e3),
    Column("flops_per_s", "GFLOP/s", flops_fmt, 1e-9),
    Column("analytic_flops", "FLOPs", ".3e"),
    Column("xla_flops", "XLA FLOPs", ".3e"),
    Column("vs_dense", "lat/dense", ".3f"),
  )


def latency_fields(timing: Timing, analytic: float, counted: float) -> dict:
  """The row fields `latency_columns` show: a `Timing` and the analytic / XLA FLOP counts."""
  return {
    "latency_s": timing.median_s,
    "latency_min_s": timing.min_s,
    "calls_per_sample": timing.number,
    "analytic_flops": analytic,
    "xla_flops": counted,
    "flops_per_s": analytic / timing.median_s,
  }


@dataclasses.dataclass
class SuiteResult:
  """One suite's measurements: `rows` (one dict per measurement), `summary` (ratios and the
  issue's targets), `notes` (what was not measured and why), `columns` (for the table)."""

  rows: list[dict[str, Any]]
  summary: list[dict[str, Any]]
  notes: list[str]
  columns: tuple[Column, ...]
  skipped: bool = False

  def to_json(self) -> dict[str, Any]:
    return {
      "skipped": self.skipped,
      "notes": self.notes,
      "summary": self.summary,
      "rows": self.rows,
    }


def summary_line(
  metric: str,
  value: float,
  *,
  at_most: float | None = None,
  at_least: float | None = None,
  judged: bool = False,
) -> dict[str, Any]:
  """A ratio or total, with its target if it has one. `met` is None unless `judged`: the issue
  states its targets for the full shapes, so a tiny run (or another batch size) records the
  value and the target without a verdict."""
  if at_most is not None:
    goal, met = f"<= {at_most:g}", value <= at_most
  elif at_least is not None:
    goal, met = f">= {at_least:g}", value >= at_least
  else:
    goal, met = None, None
  return {
    "metric": metric,
    "value": value,
    "target": goal,
    "met": bool(met) if goal and judged else None,
  }


def mlp_config(size: str) -> ml_collections.ConfigDict:
  """The MLP the suites measure: configs/default.py (784→256→256→10, R=64), or its `smoke`
  miniature at size tiny."""
  return default.get_config("smoke" if size == "tiny" else None)


def wide_mlp_config(size: str) -> ml_collections.ConfigDict:
  """A wider MLP where the multi-rank strategies differ in cost (the train suite): hidden widths
  2048, 2048 and R = 1024 (64, 64 and R = 32 at size tiny), otherwise `mlp_config`."""
  config = mlp_config(size)
  config.model.hidden = (64, 64) if size == "tiny" else (2048, 2048)
  config.model.max_rank = 32 if size == "tiny" else 1024
  return config


def eval_program(module: nnx.Module):
  """(jit(leaves, x, rank) → the module's output at a *static* rank, the module's state as a flat
  list of arrays): one XLA program per rank, as nsn_jax.evaluate.RankEvaluator builds it. rank
  None calls a module that takes no rank.

  The state is flattened once, here, not on every call: JAX flattens an nnx.State in Python,
  ~9 µs for the MLP's 8 arrays and ~260 µs for a 30-block decoder's 272 on the 2-core CPU, while a
  list of arrays takes ~1 µs and ~10 µs. A server holds its weights fixed and would not pay that
  per call, so the latency tables leave it out. `module` may be abstract (nnx.eval_shape).
  """
  graphdef, state = nnx.split(module)
  leaves, treedef = jax.tree.flatten(state)

  def forward(leaves, x, rank):
    module = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return module(x) if rank is None else module(x, rank=rank)

  return jax.jit(forward, static_argnums=2), leaves


def xla_flops(jitted, *args) -> float:
  """XLA's FLOP count of the program `jitted(*args)` compiles to (the same executable a later
  call reuses)."""
  return float(jitted.lower(*args).compile().cost_analysis()["flops"])


def time_jax(fn, *args, policy: Policy) -> Timing:
  """Latency of `fn(*args)` to a ready result."""
  return time_fn(lambda: jax.block_until_ready(fn(*args)), policy)


def run_json_worker(command: list[str], input_text: str | None = None, env=None) -> dict:
  """Runs a worker process from the repository root (`env` added to this one's) and returns
  the JSON of its last stdout line; a RuntimeError with its stderr if it fails."""
  done = subprocess.run(
    command,
    cwd=REPO,
    input=input_text,
    env={**os.environ, **(env or {})},
    capture_output=True,
    text=True,
  )
  if done.returncode != 0:
    raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def write_report(path: str | pathlib.Path, report: dict) -> pathlib.Path:
  """Writes a benchmark's JSON report to `path` (parents created); returns the path."""
  out = pathlib.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1) + "\n")
  return out
