"""Models written the way Flax's own examples write them, with no knowledge of nsn_jax.

They call `nnx.Linear` and `nnx.MultiHeadAttention` directly and take no `rank` argument. After
`nsn.decompose_and_replace` they run at any rank inside `nsn.at_rank(rank)`, and train.py /
eval.py train and sweep them by import path (configs/custom_mlp.py):

  model.name = "custom"
  model.factory = "examples.user_models:MLP"
  model.kwargs = dict(din=784, dmid=256, dout=10)
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp


class MLP(nnx.Module):
  """images (B, ...) → flatten → din → dmid → dmid → dout logits."""

  def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
    self.linear2 = nnx.Linear(dmid, dmid, rngs=rngs)
    self.linear3 = nnx.Linear(dmid, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.linear1(x))
    x = nnx.relu(self.linear2(x))
    return self.linear3(x)


class FeedForward(nnx.Module):
  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x)))


class EncoderBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=heads, in_features=dim, decode=False, rngs=rngs
    )
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp = FeedForward(dim, hidden, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchTransformer(nnx.Module):
  """A small vision transformer: images (B, H, W, C) → patches → blocks → mean → logits."""

  def __init__(
    self,
    patch: int,
    channels: int,
    dim: int,
    heads: int,
    hidden: int,
    depth: int,
    num_classes: int,
    *,
    rngs: nnx.Rngs,
  ):
    self.patch = patch
    self.embed = nnx.Linear(patch * patch * channels, dim, rngs=rngs)
    self.blocks = nnx.List([EncoderBlock(dim, heads, hidden, rngs=rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    b, h, w, c = images.shape
    p = self.patch
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(patches.reshape(b, (h // p) * (w // p), p * p * c))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(self.norm(x), axis=1))
