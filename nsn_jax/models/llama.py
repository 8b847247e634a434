"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention, gated MLP.

One model covers Llama (incl. Llama-3's RoPE scaling), Mistral, Qwen2 (q/k/v biases) and Gemma
(an explicit head_dim, a scaled embedding, the tanh-GELU gate; its (1 + w) norm scales are
folded into the weights by the loader): `LlamaConfig` holds what differs.

Every dense projection (`attn/q|k|v|o`, `mlp/gate|up|down`, an untied `lm_head`) is a plain
`nnx.Linear`, so `decompose_and_replace` can swap any of them for an NSN layer by path
("layers/3/mlp/gate"); the model's `rank` argument opens a rank scope (`nsn_jax.layers.at_rank`)
that reaches them.

RoPE rotates *interleaved* pairs (x[..., 2i], x[..., 2i+1]): the layout of GGUF files, whose
converter permutes each head's Q/K rows so that llama.cpp can rotate adjacent pairs. Weights in
the Hugging Face layout (rotating the two halves of a head) must have those rows permuted first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import remat
from nsn_jax.layers import Rank, at_rank
from nsn_jax.sharding import BATCH_AXES, constrain

# Activation layouts inside a mesh (`sharding.constrain`; no-ops without one): the batch over
# data × fsdp, and in tensor parallelism the heads or hidden features over tensor.
RESIDUAL = (BATCH_AXES, None, None)  # (B, T, dim)
HEADS = (BATCH_AXES, None, "tensor", None)  # (B, T, heads, head_dim)
FEATURES = (BATCH_AXES, None, "tensor")  # (B, T, ffn_dim or vocab)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3's RoPE frequency scaling (`rope_type: llama3` in a Hugging Face config): wavelengths
  above original_max / low_freq_factor are stretched by `factor`, those below original_max /
  high_freq_factor are kept, and those between are interpolated. `kind="linear"` divides every
  frequency by `factor` (the other fields unused)."""

  kind: str  # "llama3" | "linear"
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max: int = 8192


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama-family decoder. Each head has head_dim features (0: dim // n_heads).

  qkv_bias: q/k/v projections with biases (Qwen2). activation: the MLP gate's (silu, or
  gelu_tanh for Gemma). embed_scale: the embedding is multiplied by it (Gemma: sqrt(dim)).
  rope_scaling: None or a `RopeScaling`.
  """

  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  head_dim: int = 0
  qkv_bias: bool = False
  activation: str = "silu"
  embed_scale: float = 1.0
  rope_scaling: RopeScaling | None = None

  def __post_init__(self):
    if not self.head_dim and not self.dim % self.n_heads:
      object.__setattr__(self, "head_dim", self.dim // self.n_heads)
    if not self.head_dim or self.n_heads % self.n_kv_heads or self.head_dim % 2:
      raise ValueError(
        "LlamaConfig needs n_heads | dim (or an explicit head_dim), n_kv_heads | n_heads and an "
        f"even head_dim; got {self}."
      )
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"LlamaConfig.activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """The rotation frequency of each of the head_dim / 2 pairs: θ^(-2i/hd), rescaled by
  `config.rope_scaling` → float32 (hd/2,)."""
  half = config.head_dim // 2
  freqs = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
  scaling = config.rope_scaling
  if scaling is None:
    return freqs.astype(np.float32)
  if scaling.kind == "linear":
    return (freqs / scaling.factor).astype(np.float32)
  wavelength = 2 * np.pi / freqs
  long_wave = scaling.original_max / scaling.low_freq_factor
  short_wave = scaling.original_max / scaling.high_freq_factor
  smooth = (scaling.original_max / wavelength - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  scaled = np.where(wavelength > long_wave, freqs / scaling.factor, freqs)
  between = (wavelength <= long_wave) & (wavelength >= short_wave)
  interpolated = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  return np.where(between, interpolated, scaled).astype(np.float32)


class KVCache(NamedTuple):
  """Per-layer keys and values, each (B, S, n_kv_heads, head_dim); slots [0, index) are filled."""

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  index: jax.Array  # int32 scalar: the next slot to write

  @classmethod
  def init(cls, config: LlamaConfig, batch: int, slots: int, dtype=jnp.float32) -> KVCache:
    """An empty cache with room for `slots` positions."""
    empty = tuple(
      jnp.zeros((batch, slots, config.n_kv_heads, config.head_dim), dtype)
      for _ in range(config.n_layers)
    )
    return cls(empty, empty, jnp.zeros((), jnp.int32))


def rope(x: jax.Array, positions: jax.Array, freqs: np.ndarray) -> jax.Array:
  """x: (B, T, H, hd) with pair i = (x[..., 2i], x[..., 2i+1]) rotated by angle pos · freqs[i]
  (`rope_frequencies`), pos from positions (B, T)."""
  angle = positions[:, :, None, None].astype(jnp.float32) * freqs  # (B, T, 1, hd/2)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = x[..., 0::2].astype(jnp.float32), x[..., 1::2].astype(jnp.float32)
  rotated = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


class RMSNorm(nnx.Module):
  """x / sqrt(mean(x²) + eps) · scale over the last axis, computed in float32."""

  def __init__(self, dim: int, eps: float, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention: n_heads query heads share n_kv_heads key/value heads."""

  def __init__(self, config: LlamaConfig, linear):
    c = self.config = config
    self.q = linear(c.dim, c.n_heads * c.head_dim, use_bias=c.qkv_bias)
    self.k = linear(c.dim, c.n_kv_heads * c.head_dim, use_bias=c.qkv_bias)
    self.v = linear(c.dim, c.n_kv_heads * c.head_dim, use_bias=c.qkv_bias)
    self.o = linear(c.n_heads * c.head_dim, c.dim)

  def __call__(self, x, positions, mask, kv, index):
    """x: (B, T, dim), positions: (B, T), mask: (T, S) or per row (B, T, S) → (B, T, dim) and
    the keys/values (B, S, n_kv_heads, hd) attended to: x's own (S = T) if kv is None, else kv
    with x's written at slot `index`."""
    c, (b, t, _) = self.config, x.shape

    def heads(layer, n):  # (B, T, n, hd), heads over tensor (Megatron: attention per device)
      return constrain(layer(x).reshape(b, t, n, c.head_dim), *HEADS)

    freqs = rope_frequencies(c)
    q = rope(heads(self.q, c.n_heads), positions, freqs)
    k = rope(heads(self.k, c.n_kv_heads), positions, freqs)
    v = heads(self.v, c.n_kv_heads)
    if kv is not None:
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
    # Query head h reads KV head h // group, the grouping of llama.cpp and HF's repeat_kv.
    q = q.reshape(b, t, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / np.sqrt(c.head_dim)
    mask = mask[:, None, None] if mask.ndim == 3 else mask  # against scores (b, k, g, t, s)
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.n_heads * c.head_dim)
    return self.o(out), (k, v)


class MLP(nnx.Module):
  """Gated: down(act(gate(x)) · up(x)), dim → ffn_dim → dim (act: silu = SwiGLU, or tanh-GELU)."""

  def __init__(self, config: LlamaConfig, linear):
    self.activation = config.activation
    self.gate = linear(config.dim, config.ffn_dim)
    self.up = linear(config.dim, config.ffn_dim)
    self.down = linear(config.ffn_dim, config.dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.activation](self.gate(x)) * self.up(x)
    return self.down(constrain(h, *FEATURES))


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, config: LlamaConfig, linear, param_dtype):
    self.attn_norm = RMSNorm(config.dim, config.norm_eps, param_dtype)
    self.attn = Attention(config, linear)
    self.mlp_norm = RMSNorm(config.dim, config.norm_eps, param_dtype)
    self.mlp = MLP(config, linear)

  def __call__(self, x, positions, mask, kv, index):
    a, kv = self.attn(self.attn_norm(x), positions, mask, kv, index)
    h = constrain(x + a, *RESIDUAL)
    return constrain(h + self.mlp(self.mlp_norm(h)), *RESIDUAL), kv


class LlamaModel(nnx.Module):
  """Token embedding → n_layers blocks → RMSNorm → vocabulary logits (tied or `lm_head`)."""

  def __init__(self, config: LlamaConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    linear = functools.partial(
      nnx.Linear, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.config = config
    self.embed = nnx.Embed(
      config.vocab_size, config.dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.layers = nnx.List([Block(config, linear, param_dtype) for _ in range(config.n_layers)])
    self.norm = RMSNorm(config.dim, config.norm_eps, param_dtype)
    self.lm_head = None if config.tie_embeddings else linear(config.dim, config.vocab_size)

  def __call__(
    self,
    tokens: jax.Array,
    rank: Rank = None,
    cache: KVCache | None = None,
    positions: jax.Array | None = None,
    starts: jax.Array | None = None,
  ) -> tuple[jax.Array, KVCache | None]:
    """tokens: int32 (B, T) → (logits float32 (B, T, vocab), the updated cache or None).

    With a cache the tokens continue its sequence: they fill slots index..index+T-1 (the cache
    must have room; under jit an overflow cannot be detected) and attend to all filled slots.
    `starts` (B,) int32 left-pads the rows: row b's slots below starts[b] are padding, never
    attended to, and its RoPE positions count from its first real slot. `positions` (B, T) or
    (T,) sets only the RoPE angles; it defaults to index + arange(T) (− starts).
    """
    b, t = tokens.shape
    start = 0 if cache is None else cache.index
    slots = t if cache is None else cache.keys[0].shape[1]
    query_slots = start + jnp.arange(t)
    mask = jnp.arange(slots)[None, :] <= query_slots[:, None]  # (T, S): causal
    if starts is not None:
      default_positions = query_slots[None, :] - starts[:, None]
      # A padding query also sees its own slot: with no visible key its softmax row would be NaN,
      # and 0 · NaN (its keys and values, masked out) would still reach the real rows' sums.
      key_slots = jnp.arange(slots)
      real = (key_slots >= starts[:, None, None]) | (key_slots == query_slots[:, None])
      mask = mask & real  # (B, T, S)
    else:
      default_positions = query_slots
    positions = jnp.broadcast_to(default_positions if positions is None else positions, (b, t))
    with at_rank(rank):
      x, keys, values = self._blocks(tokens, positions, mask, cache, start)
      logits = self.vocab_logits(x)
    new_cache = None if cache is None else KVCache(tuple(keys), tuple(values), cache.index + t)
    return logits, new_cache

  def vocab_logits(self, x: jax.Array) -> jax.Array:
    """Final normed hidden states (..., dim) → float32 logits (..., vocab): the tied embedding
    or `lm_head`. The language-modelling loss calls it a chunk of positions at a time."""
    logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
    return constrain(logits, *FEATURES).astype(jnp.float32)  # vocabulary-parallel

  def _blocks(self, tokens, positions, mask, cache, start):
    """The embedding, every block and the final norm → (x (B, T, dim), keys, values)."""
    x = self.embed(tokens)
    if self.config.embed_scale != 1.0:
      x = x * jnp.asarray(self.config.embed_scale, x.dtype)
    x = constrain(x, *RESIDUAL)
    keys, values = [], []
    run = remat.block(lambda layer, x, kv: layer(x, positions, mask, kv, start))
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      x, (k, v) = run(layer, x, kv)
      keys.append(k)
      values.append(v)
    return self.norm(x), keys, values

  def encode(self, tokens: jax.Array, mask: jax.Array, rank: Rank = None) -> jax.Array:
    """The backbone interface of `nsn_jax.models.heads`: the final normed hidden states
    (B, T, dim), no vocabulary head. Padding must be on the right: causal attention then keeps
    real tokens from ever reading it, so `mask` is only for the head's pooling."""
    del mask
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    with at_rank(rank):
      return self._blocks(tokens, positions, causal, None, 0)[0]

  def attention_flops(self, seq_len: int) -> int:
    """Per-token FLOPs of attention scores and weighted sums over seq_len positions (as run:
    the causal mask is applied to a full T × T product)."""
    return 4 * self.config.n_layers * seq_len * self.config.n_heads * self.config.head_dim

  def context_flops(self, seq_len: int) -> int:
    """Per-token FLOPs outside the linear layers (`nsn_jax.flops`): attention, and the output
    head when it is the tied embedding (an untied `lm_head` is an nnx.Linear, counted there)."""
    tied = 2 * self.config.dim * self.config.vocab_size if self.lm_head is None else 0
    return self.attention_flops(seq_len) + tied
