"""nsn_jax: nested low-rank networks in JAX/Flax."""

__version__ = "0.1.0"
