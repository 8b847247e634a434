"""Task heads on a pretrained backbone: mean pooling and a sequence classifier.

A backbone (`BertModel`, `LlamaModel`) offers `encode(tokens, mask) → hidden (B, T, dim)` (its
NSN layers at the enclosing rank scope, `nsn_jax.layers.at_rank`),
`config.dim` and `attention_flops(seq_len)`; the head reads nothing else, so one classifier
serves encoders and decoders alike.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp

from nsn_jax.layers import Rank, at_rank


def mean_pool(hidden: jax.Array, mask: jax.Array, normalize: bool = False) -> jax.Array:
  """The mean over the real tokens of hidden (B, T, dim) with mask (B, T) → float32 (B, dim);
  with normalize, each row scaled to unit L2 norm (sentence-transformers' Normalize)."""
  weights = jnp.asarray(mask).astype(jnp.float32)[..., None]
  pooled = (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


class SequenceClassifier(nnx.Module):
  """A backbone (random or pretrained), mean pooling over real tokens and a dense `head`.

  Mean pooling rather than the last token: with right padding and causal attention a decoder's
  last real token sits at a different index per row, and the mean reads every token's state.
  """

  def __init__(self, backbone: nnx.Module, num_classes: int, *, rngs: nnx.Rngs):
    self.backbone = backbone
    # Zero-initialised: a fresh head predicts uniformly, so the first updates do not push a
    # pretrained backbone with the large errors of random logits.
    self.head = nnx.Linear(
      backbone.config.dim, num_classes, kernel_init=nnx.initializers.zeros, rngs=rngs
    )

  def __call__(self, tokens: jax.Array, mask: jax.Array, rank: Rank = None) -> jax.Array:
    """tokens int32, mask bool or 0/1 (B, T) → logits float32 (B, num_classes)."""
    with at_rank(rank):
      pooled = mean_pool(self.backbone.encode(tokens, mask), mask)
      return self.head(pooled).astype(jnp.float32)

  def context_flops(self, seq_len: int) -> int:
    """Per-token FLOPs outside the linear layers (`nsn_jax.flops`): the backbone's attention."""
    return self.backbone.attention_flops(seq_len)
