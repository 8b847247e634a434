"""Pretrained language models from offline checkpoints into nsn_jax models."""
from nsn_jax.llm.gguf import GGUFTokenizer, config_from_gguf, load_gguf, smollm2_path

__all__ = ["GGUFTokenizer", "config_from_gguf", "load_gguf", "smollm2_path"]
