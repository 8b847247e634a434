"""Classification metrics at a static rank: one compiled XLA program per rank, cached."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


class RankEvaluator:
  """Evaluates `nnx.merge(graphdef, params)` at static ranks on a fixed-size batch grid.

  The last partial batch is padded (and masked out of the metrics) so every rank compiles
  exactly once, whatever the split size.
  """

  def __init__(self, graphdef: nnx.GraphDef, batch_size: int):
    self.batch_size = batch_size

    def forward(params, images, rank):
      return nnx.merge(graphdef, params)(images, rank=rank).astype(jnp.float32)

    self._forward = jax.jit(forward, static_argnums=2)
    self._compiled = {}

  def compiled(self, params, image_shape: tuple[int, ...], rank):
    """The rank's XLA executable for one batch, compiled on first use and then reused."""
    key = (rank, image_shape)
    if key not in self._compiled:
      images = jax.ShapeDtypeStruct((self.batch_size, *image_shape), jnp.float32)
      self._compiled[key] = self._forward.lower(params, images, rank).compile()
    return self._compiled[key]

  def compiled_flops(self, params, image_shape: tuple[int, ...], rank) -> float:
    """XLA's FLOP count of the rank's compiled program for one batch."""
    return float(self.compiled(params, image_shape, rank).cost_analysis()["flops"])

  def __call__(self, params, images: np.ndarray, labels: np.ndarray, rank) -> dict[str, float]:
    """images (N, ...) float32, labels (N,) int → accuracy, loss (mean CE, nats) and the median
    wall-clock latency of one batch in seconds (compile excluded)."""
    n = len(labels)
    pad = -n % self.batch_size
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    forward = self.compiled(params, images.shape[1:], rank)
    jax.block_until_ready(forward(params, images[:self.batch_size]))  # warm-up
    correct = loss = 0.0
    latencies = []
    for start in range(0, n + pad, self.batch_size):
      t0 = time.perf_counter()
      logits = np.asarray(forward(params, images[start:start + self.batch_size]))
      latencies.append(time.perf_counter() - t0)
      keep = slice(0, min(self.batch_size, n - start))
      batch_labels = labels[start:start + self.batch_size]
      logits = logits[keep]
      correct += float(np.sum(np.argmax(logits, -1) == batch_labels))
      loss += float(np.sum(optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels)))
    return {"accuracy": correct / n, "loss": loss / n,
            "latency_s": float(np.median(latencies))}
