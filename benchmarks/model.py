"""Per-rank inference of the NSN MLP (configs/default.py) against the same MLP with dense layers."""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from benchmarks.common import (Column, SuiteResult, eval_program, mlp_config, summary_line,
                               time_jax, xla_flops)
from benchmarks.timing import Policy
from nsn_jax import flops
from nsn_jax.models.build import build_model

BATCHES = {"tiny": (1, 8), "full": (1, 128, 1024)}
NOT_MEASURED = ("SmolLM2-sized decoder: nsn_jax has no decoder model yet (nsn_jax.models builds "
                "only 'nsn_mlp'), so the issue's decoder rows are not measured.")

COLUMNS = (
    Column("kind", "kind"), Column("batch", "batch"), Column("rank", "rank"),
    Column("latency_s", "us", ".1f", 1e6), Column("latency_min_s", "min us", ".1f", 1e6),
    Column("flops_per_s", "GFLOP/s", ".2f", 1e-9), Column("analytic_flops", "FLOPs", ".3e"),
    Column("xla_flops", "XLA FLOPs", ".3e"), Column("vs_dense", "lat/dense", ".3f"),
)


class DenseMLP(nnx.Module):
  """NSNMLP's architecture with plain dense hidden layers: the model NSN's FLOPs compare to."""

  def __init__(self, input_dim: int, hidden: Sequence[int], num_classes: int, *, rngs):
    widths = [input_dim, *hidden, num_classes]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])

  def __call__(self, x):
    """x: (B, ...) images → logits (B, num_classes)."""
    x = x.reshape(x.shape[0], -1)
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def rank_grid(max_rank: int) -> tuple[int, ...]:
  """Powers of two up to R, and R: 1, 2, 4, ..., 64 for the default MLP."""
  return tuple(sorted({2 ** i for i in range(max_rank.bit_length()) if 2 ** i <= max_rank}
                      | {max_rank}))


def run(size: str, policy: Policy) -> SuiteResult:
  config = mlp_config(size)
  nsn = build_model(config, seed=0)
  dense = DenseMLP(math.prod(config.data.image_shape), config.model.hidden,
                   config.data.num_classes, rngs=nnx.Rngs(0))
  nsn_forward, dense_forward = (eval_program(nnx.graphdef(m)) for m in (nsn, dense))
  nsn_state, dense_state = nnx.state(nsn), nnx.state(dense)
  ranks = rank_grid(flops.max_rank(nsn))

  rng = np.random.default_rng(1)  # host-side inputs: no random-number programs to compile
  rows = []
  for batch in BATCHES[size]:
    x = jax.device_put(rng.random((batch, *config.data.image_shape), np.float32))
    measured = [("dense", None, dense_forward, dense_state, flops.dense_model_flops(nsn)),
                *[("nsn", r, nsn_forward, nsn_state, flops.model_flops(nsn, r)) for r in ranks]]
    batch_rows = []
    for kind, rank, fn, state, flops_per_row in measured:
      counted = xla_flops(fn, state, x, rank)  # compiles the program the timed calls reuse
      timing = time_jax(fn, state, x, rank, policy=policy)
      batch_rows.append({
          "kind": kind, "batch": batch, "rank": rank, "latency_s": timing.median_s,
          "latency_min_s": timing.min_s, "calls_per_sample": timing.number,
          "analytic_flops": batch * flops_per_row, "xla_flops": counted,
          "flops_per_s": batch * flops_per_row / timing.median_s})
    for row in batch_rows:
      row["vs_dense"] = row["latency_s"] / batch_rows[0]["latency_s"]
    rows += batch_rows

  r = max(ranks)
  summary = []
  for batch in BATCHES[size]:
    latency = {row["rank"]: row["latency_s"] for row in rows
               if row["batch"] == batch and row["kind"] == "nsn"}
    summary += [
        summary_line(f"batch {batch}: latency(R/4) / latency(R)", latency[r // 4] / latency[r]),
        summary_line(f"batch {batch}: latency(R) / dense MLP latency",
                     next(row["vs_dense"] for row in rows
                          if row["batch"] == batch and row["rank"] == r)),
    ]
  return SuiteResult(rows, summary, [NOT_MEASURED], COLUMNS)
