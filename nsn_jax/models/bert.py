"""A BERT encoder in Flax NNX: learned absolute positions, post-LN blocks, exact (erf) GELU.

Every dense projection (`attn/q|k|v|o`, `mlp/up|down`) is a plain `nnx.Linear`, so
`decompose_and_replace` can swap any of them for an NSN layer by path ("layers/3/mlp/up"); the
model's `rank` argument opens a rank scope (`nsn_jax.layers.at_rank`) that reaches them. There
is no dropout.

`nsn_jax.models.heads.mean_pool` with `normalize=True` is the sentence-transformers pooling of
models such as all-MiniLM-L6-v2: the mean of the unpadded tokens' hidden states, scaled to unit
L2 norm.
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import remat
from nsn_jax.layers import Rank, at_rank
from nsn_jax.sharding import BATCH_AXES, constrain


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Sizes of a BERT encoder; each head has head_dim = dim // n_heads features."""

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  ffn_dim: int
  max_positions: int = 512
  type_vocab_size: int = 2
  norm_eps: float = 1e-12

  def __post_init__(self):
    sizes = (
      self.vocab_size,
      self.dim,
      self.n_layers,
      self.n_heads,
      self.ffn_dim,
      self.max_positions,
      self.type_vocab_size,
    )
    if min(sizes) < 1 or self.dim % self.n_heads or not self.norm_eps > 0:
      raise ValueError(
        f"BertConfig needs positive sizes, n_heads | dim and norm_eps > 0; got {self}."
      )

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads


class Embeddings(nnx.Module):
  """word(token) + position(t) + token_type(type), then LayerNorm."""

  def __init__(self, config: BertConfig, layer_norm, *, dtype, param_dtype, rngs: nnx.Rngs):
    embed = functools.partial(
      nnx.Embed, features=config.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.word = embed(config.vocab_size)
    self.position = embed(config.max_positions)
    self.token_type = embed(config.type_vocab_size)
    self.norm = layer_norm()

  def __call__(self, tokens: jax.Array, token_types: jax.Array) -> jax.Array:
    """tokens, token_types: int (B, T) → (B, T, dim)."""
    positions = jnp.arange(tokens.shape[1])
    return self.norm(
      self.word(tokens) + self.position(positions)[None] + self.token_type(token_types)
    )


class Attention(nnx.Module):
  """Bidirectional multi-head self-attention over the unpadded keys."""

  def __init__(self, config: BertConfig, linear):
    c = self.config = config
    self.q = linear(c.dim, c.dim)
    self.k = linear(c.dim, c.dim)
    self.v = linear(c.dim, c.dim)
    self.o = linear(c.dim, c.dim)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: (B, T, dim), mask: bool (B, T), True for real tokens → (B, T, dim)."""
    c, (b, t, _) = self.config, x.shape
    q, k, v = (layer(x).reshape(b, t, c.n_heads, c.head_dim) for layer in (self.q, self.k, self.v))
    scores = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / np.sqrt(c.head_dim)
    # A finite fill, not -inf: an all-padding row then averages instead of producing NaN.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, c.dim)
    return self.o(out)


class MLP(nnx.Module):
  """down(gelu(up(x))), dim → ffn_dim → dim, with the exact erf GELU of BERT."""

  def __init__(self, config: BertConfig, linear):
    self.up = linear(config.dim, config.ffn_dim)
    self.down = linear(config.ffn_dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x), approximate=False))


class Block(nnx.Module):
  """Post-norm residual block: h = norm(x + attn(x)), then norm(h + mlp(h))."""

  def __init__(self, config: BertConfig, linear, layer_norm):
    self.attn = Attention(config, linear)
    self.attn_norm = layer_norm()
    self.mlp = MLP(config, linear)
    self.mlp_norm = layer_norm()

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    h = self.attn_norm(x + self.attn(x, mask))
    return self.mlp_norm(h + self.mlp(h))


class BertModel(nnx.Module):
  """Embeddings → n_layers post-norm blocks → the last hidden states (no pooler)."""

  def __init__(self, config: BertConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    linear = functools.partial(nnx.Linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Two-pass variance: E[x²] − E[x]² loses digits when a feature's mean dominates its spread.
    layer_norm = functools.partial(
      nnx.LayerNorm,
      config.dim,
      epsilon=config.norm_eps,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.config = config
    self.embeddings = Embeddings(
      config, layer_norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.layers = nnx.List([Block(config, linear, layer_norm) for _ in range(config.n_layers)])

  def __call__(
    self,
    tokens: jax.Array,
    mask: jax.Array,
    rank: Rank = None,
    token_types: jax.Array | None = None,
  ) -> jax.Array:
    """tokens: int32 (B, T), mask: bool or 0/1 (B, T), 1 for real tokens → hidden (B, T, dim).

    Padded positions get hidden states too (they attend to the real tokens) but no real token
    attends to them. token_types (B, T) default to segment 0.
    """
    if tokens.shape[1] > self.config.max_positions:
      raise ValueError(
        f"sequence length {tokens.shape[1]} exceeds max_positions {self.config.max_positions}."
      )
    mask = jnp.asarray(mask).astype(bool)
    x = self.embeddings(tokens, jnp.zeros_like(tokens) if token_types is None else token_types)
    x = constrain(x, BATCH_AXES, None, None)  # the batch over data × fsdp inside a mesh
    run = remat.block(lambda layer, x: layer(x, mask))
    with at_rank(rank):
      for layer in self.layers:
        x = constrain(run(layer, x), BATCH_AXES, None, None)
    return x

  def encode(self, tokens: jax.Array, mask: jax.Array, rank: Rank = None) -> jax.Array:
    """The backbone interface of `nsn_jax.models.heads`: hidden (B, T, dim), segment 0."""
    return self(tokens, mask, rank)

  def attention_flops(self, seq_len: int) -> int:
    """Per-token FLOPs of attention scores and weighted sums over seq_len positions."""
    return 4 * self.config.n_layers * seq_len * self.config.dim

  context_flops = attention_flops  # an encoder has no output head beyond its linear layers
