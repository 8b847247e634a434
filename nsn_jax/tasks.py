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
from typing import Any

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


@dataclasses.dataclass(frozen=True)
class Task:
  """logits(model, batch, rank) → (B, ..., C); targets(batch) → (labels (B, ...), weights)."""

  name: str
  logits: Callable[[Any, Batch, Any], jax.Array]
  targets: Callable[[Batch], tuple[jax.Array, jax.Array]]
  keys: tuple[str, ...]  # the batch arrays the task reads

  def scores(
    self, logits: jax.Array, batch: Batch, rows: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Sums over the batch: `loss` (weighted CE, nats), `correct` and `weight` (the number of
    scored examples or tokens), float32 scalars. `rows` (B,) 0/1 drops padded rows."""
    labels, weights = self.targets(batch)
    if rows is not None:
      weights = weights * rows.reshape(rows.shape + (1,) * (weights.ndim - 1))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
      "loss": jnp.sum(ce * weights),
      "correct": jnp.sum(hits * weights),
      "weight": jnp.sum(weights),
    }


TASKS = {
  task.name: task
  for task in (
    Task("image_classification", _image_logits, _label_targets, ("image", "label")),
    Task("text_classification", _text_logits, _label_targets, ("tokens", "mask", "label")),
    Task("language_modelling", _next_token_logits, _next_token_targets, ("tokens", "mask")),
  )
}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}.")
  return TASKS[name]
