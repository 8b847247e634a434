"""Task metrics at a static rank: one compiled XLA program per rank, cached."""

from __future__ import annotations

import math
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from nsn_jax import sharding
from nsn_jax.layers import effective_rank
from nsn_jax.tasks import Task


class RankEvaluator:
  """Evaluates `nnx.merge(graphdef, params)` on `task` at static ranks, on a fixed batch grid.

  The last partial batch is padded (and masked out of the metrics) so every rank compiles
  exactly once, whatever the split size. The program returns sums, not logits, so a language
  model's (B, T, vocab) logits never leave the device. With a `mesh`, each batch is split over
  its data and fsdp axes (data-parallel evaluation; `batch_size` rounded up to a multiple of
  them), on every process of a cluster alike. `per_row`: the sums are also kept per example
  (`__call__` returns them as "rows"), for bootstrap intervals over examples.
  """

  def __init__(
    self,
    graphdef: nnx.GraphDef,
    batch_size: int,
    task: Task,
    mesh: Mesh | None = None,
    per_row: bool = False,
  ):
    self.task, self.per_row = task, per_row
    self.sharding = None if mesh is None else sharding.batch_sharding(mesh)
    split = 1 if mesh is None else math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    self.batch_size = -(-batch_size // split) * split

    @sharding.with_mesh(mesh)  # no mesh: a no-op
    def scores(params, batch, rows, rank):
      return task.rank_scores(nnx.merge(graphdef, params), batch, rank, rows, per_row)

    self._scores = jax.jit(scores, static_argnums=3)
    self._forward = jax.jit(
      lambda params, batch, rank: task.logits(nnx.merge(graphdef, params), batch, rank),
      static_argnums=2,
    )
    self._compiled = {}

  def _example(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    return {
      k: jax.ShapeDtypeStruct(
        (self.batch_size, *arrays[k].shape[1:]), arrays[k].dtype, sharding=self.sharding
      )
      for k in self.task.keys
    }

  def _place(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """One host batch (the same on every process) as the program's input."""
    if self.sharding is None:
      return batch
    return sharding.global_batch(self.sharding, self.batch_size, np.arange(self.batch_size), batch)

  def compiled(self, params, arrays: dict[str, np.ndarray], rank):
    """The rank's XLA executable for one batch shaped like `arrays`, compiled once, reused."""
    example, rank = self._example(arrays), effective_rank(rank)
    key = (rank, tuple((k, v.shape, str(v.dtype)) for k, v in example.items()))
    if key not in self._compiled:
      rows = jax.ShapeDtypeStruct((self.batch_size,), jnp.float32, sharding=self.sharding)
      self._compiled[key] = self._scores.lower(params, example, rows, rank).compile()
    return self._compiled[key]

  def forward_flops(self, params, arrays: dict[str, np.ndarray], rank) -> float:
    """XLA's FLOP count of the model's forward pass (logits, no loss) at `rank` for one batch:
    the cross-check of the analytic count. Read from the lowered program, so nothing compiles."""
    lowered = self._forward.lower(params, self._example(arrays), effective_rank(rank))
    return float(lowered.cost_analysis()["flops"])

  def __call__(self, params, arrays: dict[str, np.ndarray], rank) -> dict[str, float]:
    """arrays: the split, {key: (N, ...)} for the task's keys → accuracy, loss (mean CE over
    scored examples or tokens, nats) and the median wall-clock latency of one batch in seconds
    (compile excluded); with `per_row` also "rows": {loss, correct, weight: float64 (N,)}, each
    example's sums (a token count as its weight for language modelling)."""
    n = len(arrays[self.task.keys[0]])
    pad = -n % self.batch_size
    padded = {
      k: np.concatenate([arrays[k], np.zeros((pad, *arrays[k].shape[1:]), arrays[k].dtype)])
      for k in self.task.keys
    }
    program = self.compiled(params, arrays, rank)
    padded["rows"] = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])

    def batch_at(start: int) -> tuple[dict, Any]:
      batch = self._place({k: v[start : start + self.batch_size] for k, v in padded.items()})
      return batch, batch.pop("rows")

    jax.block_until_ready(program(params, *batch_at(0)))  # warm-up
    parts = {"loss": [], "correct": [], "weight": []}
    latencies = []
    for start in range(0, n + pad, self.batch_size):
      t0 = time.perf_counter()
      sums = {k: sharding.to_host(v) for k, v in program(params, *batch_at(start)).items()}
      latencies.append(time.perf_counter() - t0)
      for key, values in parts.items():
        values.append(np.asarray(sums[key], np.float64).reshape(-1))
    rows = {
      key: np.concatenate(values)[: n if self.per_row else None] for key, values in parts.items()
    }
    totals = {key: float(np.sum(values)) for key, values in rows.items()}
    metrics = {
      "accuracy": totals["correct"] / totals["weight"],
      "loss": totals["loss"] / totals["weight"],
      "latency_s": float(np.median(latencies)),
    }
    return metrics | ({"rows": rows} if self.per_row else {})
