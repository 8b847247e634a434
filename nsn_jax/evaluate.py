"""Task metrics at a static rank: one compiled XLA program per rank, cached."""

from __future__ import annotations

import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax.tasks import Task


class RankEvaluator:
  """Evaluates `nnx.merge(graphdef, params)` on `task` at static ranks, on a fixed batch grid.

  The last partial batch is padded (and masked out of the metrics) so every rank compiles
  exactly once, whatever the split size. The program returns sums, not logits, so a language
  model's (B, T, vocab) logits never leave the device.
  """

  def __init__(self, graphdef: nnx.GraphDef, batch_size: int, task: Task):
    self.batch_size, self.task = batch_size, task

    def scores(params, batch, rows, rank):
      return task.scores(task.logits(nnx.merge(graphdef, params), batch, rank), batch, rows)

    self._scores = jax.jit(scores, static_argnums=3)
    self._forward = jax.jit(
      lambda params, batch, rank: task.logits(nnx.merge(graphdef, params), batch, rank),
      static_argnums=2,
    )
    self._compiled = {}

  def _example(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    return {
      k: jax.ShapeDtypeStruct((self.batch_size, *arrays[k].shape[1:]), arrays[k].dtype)
      for k in self.task.keys
    }

  def compiled(self, params, arrays: dict[str, np.ndarray], rank):
    """The rank's XLA executable for one batch shaped like `arrays`, compiled once, reused."""
    example = self._example(arrays)
    key = (rank, tuple((k, v.shape, str(v.dtype)) for k, v in example.items()))
    if key not in self._compiled:
      rows = jax.ShapeDtypeStruct((self.batch_size,), jnp.float32)
      self._compiled[key] = self._scores.lower(params, example, rows, rank).compile()
    return self._compiled[key]

  def forward_flops(self, params, arrays: dict[str, np.ndarray], rank) -> float:
    """XLA's FLOP count of the model's forward pass (logits, no loss) at `rank` for one batch:
    the cross-check of the analytic count. Read from the lowered program, so nothing compiles."""
    return float(self._forward.lower(params, self._example(arrays), rank).cost_analysis()["flops"])

  def __call__(self, params, arrays: dict[str, np.ndarray], rank) -> dict[str, float]:
    """arrays: the split, {key: (N, ...)} for the task's keys → accuracy, loss (mean CE over
    scored examples or tokens, nats) and the median wall-clock latency of one batch in seconds
    (compile excluded)."""
    n = len(arrays[self.task.keys[0]])
    pad = -n % self.batch_size
    padded = {
      k: np.concatenate([arrays[k], np.zeros((pad, *arrays[k].shape[1:]), arrays[k].dtype)])
      for k in self.task.keys
    }
    rows = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    program = self.compiled(params, arrays, rank)
    batch_at = lambda start: {k: v[start : start + self.batch_size] for k, v in padded.items()}
    jax.block_until_ready(program(params, batch_at(0), rows[: self.batch_size]))  # warm-up
    totals = {"loss": 0.0, "correct": 0.0, "weight": 0.0}
    latencies = []
    for start in range(0, n + pad, self.batch_size):
      t0 = time.perf_counter()
      sums = jax.device_get(program(params, batch_at(start), rows[start : start + self.batch_size]))
      latencies.append(time.perf_counter() - t0)
      for key in totals:
        totals[key] += float(sums[key])
    return {
      "accuracy": totals["correct"] / totals["weight"],
      "loss": totals["loss"] / totals["weight"],
      "latency_s": float(np.median(latencies)),
    }
