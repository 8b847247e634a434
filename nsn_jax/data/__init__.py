"""Datasets (TFDS builders, your own arrays) and the grain input pipeline."""

from nsn_jax.data.arrays import save_arrays

__all__ = ["save_arrays"]
