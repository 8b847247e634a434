"""The paper's from-scratch model: image → flatten → NSN hidden layers → dense classifier."""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from nsn_jax.layers import NSNDense, Rank, at_rank, name_nsn_layers
from nsn_jax.sharding import BATCH_AXES, constrain


class NSNMLP(nnx.Module):
  """An MLP whose hidden layers are NSN layers sharing one rank argument.

  The classifier stays dense (it is d_hidden × num_classes, too small to be worth factorising).
  `max_rank=None` builds the dense twin: plain `nnx.Linear` hidden layers, no ranks.
  """

  def __init__(
    self,
    input_dim: int,
    hidden: Sequence[int],
    num_classes: int,
    max_rank: int | None,
    *,
    dtype=None,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    widths = [input_dim, *hidden]
    self.hidden = nnx.List(
      [
        nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if max_rank is None
        else NSNDense(d_in, d_out, max_rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for d_in, d_out in zip(widths[:-1], widths[1:])
      ]
    )
    self.head = nnx.Linear(widths[-1], num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    name_nsn_layers(self)

  def __call__(self, x: jax.Array, rank: Rank = None) -> jax.Array:
    """x: (B, ...) images → logits (B, num_classes) at `rank` (int, jax int array or profile)."""
    x = x.reshape(x.shape[0], -1)
    with at_rank(rank):
      for layer in self.hidden:  # inside a mesh: the batch over data × fsdp, features over tensor
        x = constrain(jax.nn.relu(layer(x)), BATCH_AXES, "tensor")
    return self.head(x)
