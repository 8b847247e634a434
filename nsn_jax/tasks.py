"""Tasks: what a model reads from a batch and what its logits are scored against.

Every task reduces to weighted token- or example-level classification, so one objective, one
evaluator and one sweep serve them all:

  image_classification  model(image (B, H, W, C)) → (B, C) against label (B,)
  text_classification   model(tokens, mask (B, T)) → (B, C) against label (B,)
  language_modelling    model(tokens (B, T)) → logits (B, T, V), or (logits, cache) as a
                        decoder with a KV cache returns; the next-token logits (B, T−1, V) are
                        scored against tokens[:, 1:], weighted by mask[:, 1:] (padding never)

The model runs inside a rank scope (`nsn_jax.layers.apply`), so any NNX model works, whether or
not it takes a `rank` argument of its own.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from nsn_jax.layers import apply

Batch = dict[str, jax.Array]


def _image_logits(model, batch: Batch, rank) -> jax.Array:
  return apply(model, batch["image"], rank=rank)


def _text_logits(model, batch: Batch, rank) -> jax.Array:
  return apply(model, batch["tokens"], batch["mask"], rank=rank)


def _next_token_logits(model, batch: Batch, rank) -> jax.Array:
  out = apply(model, batch["tokens"], rank=rank)
  return (out[0] if isinstance(out, tuple) else out)[:, :-1]


def _label_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
  return batch["label"], jnp.ones(batch["label"].shape, jnp.float32)


def _next_token_targets(batch: Batch) -> tuple[jax.Array, jax.Array]:
  return batch["tokens"][:, 1:], batch["mask"][:, 1:].astype(jnp.float32)


def weighted_scores(
  logits: jax.Array, labels: jax.Array, weights: jax.Array, per_row: bool = False
) -> dict:
  """Sums over examples (or tokens): `loss` (weighted CE, nats), `correct` and `weight` (the
  number of scored examples or tokens), float32 scalars, or (B,) sums per row (example) with
  `per_row` (what a bootstrap over examples resamples). logits (B, ..., C), labels (B, ...)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  total = (lambda x: jnp.sum(x, axis=tuple(range(1, x.ndim)))) if per_row else jnp.sum
  return {
    "loss": total(ce * weights),
    "correct": total(hits * weights),
    "weight": total(weights),
  }


def _row_weights(weights: jax.Array, rows: jax.Array | None) -> jax.Array:
  """`weights` (B, ...) with padded rows (rows (B,) 0/1) dropped."""
  if rows is None:
    return weights
  return weights * rows.reshape(rows.shape + (1,) * (weights.ndim - 1))


@dataclasses.dataclass(frozen=True)
class Task:
  """logits(model, batch, rank) → (B, ..., C); targets(batch) → (labels (B, ...), weights).

  `chunk`: language modelling on a decoder with `vocab_logits` (LlamaModel) scores that many
  positions at a time (0: all at once); see `rank_scores`.
  """

  name: str
  logits: Callable[[Any, Batch, Any], jax.Array]
  targets: Callable[[Batch], tuple[jax.Array, jax.Array]]
  keys: tuple[str, ...]  # the batch arrays the task reads
  chunk: int = 0

  def scores(
    self, logits: jax.Array, batch: Batch, rows: jax.Array | None = None, per_row: bool = False
  ) -> dict[str, jax.Array]:
    """`weighted_scores` of `logits` against the batch's targets. `rows` (B,) 0/1 drops padded
    rows."""
    labels, weights = self.targets(batch)
    return weighted_scores(logits, labels, _row_weights(weights, rows), per_row)

  def rank_scores(
    self,
    model: Any,
    batch: Batch,
    rank: Any,
    rows: jax.Array | None = None,
    per_row: bool = False,
  ) -> dict[str, jax.Array]:
    """`scores` of the model's logits at `rank`, what training and evaluation read. For next
    tokens from a decoder they are computed `chunk` positions at a time under jax.checkpoint:
    the (B, T, vocab) logits, k× under a multi-rank vmap, never exist whole, and the backward
    pass recomputes one chunk's instead of keeping them all."""
    chunkable = hasattr(model, "encode") and hasattr(model, "vocab_logits")  # LlamaModel's
    if not (self.chunk and self.name == "language_modelling" and chunkable):
      return self.scores(self.logits(model, batch, rank), batch, rows, per_row)
    hidden = apply(model.encode, batch["tokens"], batch["mask"], rank=rank)[:, :-1]
    labels, weights = self.targets(batch)
    weights = _row_weights(weights, rows)
    return _chunked_scores(model, rank, hidden, labels, weights, self.chunk, per_row)


def _chunked_scores(
  model, rank, hidden, labels, weights, chunk: int, per_row: bool = False
) -> dict[str, jax.Array]:
  """`weighted_scores` of model.vocab_logits(hidden) at `rank`, `chunk` positions at a time.
  hidden (B, T, dim); labels, weights (B, T)."""
  chunk = min(chunk, hidden.shape[1])
  graphdef, state = nnx.split(model)

  @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan: no CSE to prevent
  def scored(state, x, y, w):  # the state goes in explicitly: we may be inside a vmap
    logits = apply(nnx.merge(graphdef, state).vocab_logits, x, rank=rank)
    return weighted_scores(logits, y, w, per_row)

  def add(total, xs):
    return jax.tree.map(jnp.add, total, scored(state, *xs)), None

  shape = labels.shape[:1] if per_row else ()
  zeros = dict.fromkeys(("loss", "correct", "weight"), jnp.zeros(shape, jnp.float32))
  chunks = tuple(_chunks(x, chunk) for x in (hidden, labels, weights))
  return jax.lax.scan(add, zeros, chunks)[0]


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
  """(B, T, ...) → (T/chunk, B, chunk, ...), T zero-padded to a multiple of `chunk` (padded
  positions get weight 0)."""
  x = jnp.pad(x, [(0, 0), (0, -x.shape[1] % chunk)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape(x.shape[0], -1, chunk, *x.shape[2:]), 0, 1)


TASKS = {
  task.name: task
  for task in (
    Task("image_classification", _image_logits, _label_targets, ("image", "label")),
    Task("text_classification", _text_logits, _label_targets, ("tokens", "mask", "label")),
    Task("language_modelling", _next_token_logits, _next_token_targets, ("tokens", "mask")),
  )
}


def get_task(name: str, chunk: int = 0) -> Task:
  """The task called `name`; `chunk`: positions per chunk of a language-modelling loss
  (`train.loss_chunk`; 0: whole sequences)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}.")
  return dataclasses.replace(TASKS[name], chunk=chunk)


def config_task(config) -> Task:
  """The task a run's config names (`task`, with `train.loss_chunk`)."""
  return get_task(config.task, config.train.loss_chunk)
