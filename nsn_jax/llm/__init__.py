"""Pretrained language models from offline checkpoints into nsn_jax models."""

from nsn_jax.llm.gguf import (
  GGUFTokenizer,
  config_from_gguf,
  gguf_metadata,
  load_gguf,
  open_gguf,
  smollm2_path,
)
from nsn_jax.llm.hf import config_from_hf, load_hf_bert, minilm_path

__all__ = [
  "GGUFTokenizer",
  "config_from_gguf",
  "config_from_hf",
  "gguf_metadata",
  "load_gguf",
  "load_hf_bert",
  "open_gguf",
  "minilm_path",
  "smollm2_path",
]
