"""Pretrained language models from offline checkpoints into nsn_jax models.

`load_pretrained(path)` reads what a user points at: a GGUF file (Llama family), or a Hugging
Face directory with config.json (BERT; Llama, Mistral, Qwen2, Gemma decoders).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from nsn_jax.llm.gguf import (
  GGUFTokenizer,
  config_from_gguf,
  gguf_metadata,
  load_gguf,
  open_gguf,
  smollm2_path,
)
from nsn_jax.llm.hf import config_from_hf, load_hf_bert, minilm_path
from nsn_jax.llm.hf_decoder import FAMILIES, config_from_hf_decoder, load_hf_decoder
from nsn_jax.llm.tokenizer import HFTokenizer, render_chat
from nsn_jax.sharding import Layout

EXPECTED = (
  "a GGUF file (Llama family) or a Hugging Face directory with config.json and safetensors "
  f"(model_type bert, {', '.join(FAMILIES)})"
)


def pretrained_kind(path: str | os.PathLike) -> str:
  """ "gguf", "bert" or "hf_decoder": what `path` holds. Raises FileNotFoundError or ValueError
  naming the path and what was expected."""
  path = pathlib.Path(path)
  if path.is_file():
    with open(path, "rb") as f:
      if f.read(4) == b"GGUF":
        return "gguf"
    raise ValueError(f"{path} is not a GGUF file; expected {EXPECTED}.")
  if not path.is_dir():
    raise FileNotFoundError(f"{path} does not exist; expected {EXPECTED}.")
  config = path / "config.json"
  if not config.is_file():
    raise ValueError(f"{path} has no config.json; expected {EXPECTED}.")
  try:
    settings = json.loads(config.read_text())
  except ValueError as e:
    raise ValueError(f"{config} is not JSON ({e}); expected {EXPECTED}.") from None
  model_type = settings.get("model_type") if isinstance(settings, dict) else None
  if model_type == "bert":
    return "bert"
  if model_type in FAMILIES:
    return "hf_decoder"
  raise ValueError(f"{config} has model_type {model_type!r}; expected {EXPECTED}.")


def load_pretrained(
  path: str | os.PathLike, dtype=None, layout: Layout | None = None
) -> tuple[Any, Any, Any]:
  """(config, model, tokenizer) of a GGUF file or a Hugging Face directory (`pretrained_kind`).
  `layout` (`nsn_jax.sharding.config_layout`) loads each parameter straight into its sharding;
  None: onto the default device."""
  kind = pretrained_kind(path)
  load = {"gguf": load_gguf, "bert": load_hf_bert, "hf_decoder": load_hf_decoder}[kind]
  return load(path, dtype, layout)


__all__ = [
  "GGUFTokenizer",
  "HFTokenizer",
  "config_from_gguf",
  "config_from_hf",
  "config_from_hf_decoder",
  "gguf_metadata",
  "load_gguf",
  "load_hf_bert",
  "load_hf_decoder",
  "load_pretrained",
  "open_gguf",
  "minilm_path",
  "pretrained_kind",
  "render_chat",
  "smollm2_path",
]
