"""The `shakespeare` TFDS builder (configs `genre`, `lm`): passages of 36 plays, split by play."""

from nsn_jax.data.shakespeare.shakespeare import Shakespeare

__all__ = ["Shakespeare"]
