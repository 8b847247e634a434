"""Model families, built from a config by name."""
from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
from flax import nnx

from nsn_jax.models.mlp import NSNMLP

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config: ml_collections.ConfigDict, *, seed: int) -> nnx.Module:
  """The model that `config.model` describes, initialised from `seed`."""
  name = config.model.name
  dtype = _DTYPES[config.model.get("dtype", "float32")]
  if name == "nsn_mlp":
    return NSNMLP(math.prod(config.data.image_shape), tuple(config.model.hidden),
                  config.data.num_classes, config.model.max_rank, dtype=dtype,
                  rngs=nnx.Rngs(params=seed))
  raise ValueError(f"unknown model name {name!r}; known: 'nsn_mlp'.")
