"""Hugging Face decoder checkpoints (Llama incl. Llama-3 RoPE scaling, Mistral, Qwen2/2.5, Gemma)
→ `LlamaModel` and their tokenizer, and a dense `LlamaModel` back out (`save_hf_decoder`).

A directory with config.json and safetensors weights (one file, or shards with an index), read
one tensor at a time from memory-mapped files (`safetensors_io`). HF keeps each head's RoPE pairs
as (i, i + hd/2); `LlamaModel` rotates interleaved pairs (2i, 2i+1), the GGUF layout, so the
q/k rows (and Qwen2's q/k biases) are permuted per head on the way in (`to_interleaved`) and back
on the way out: q and k share the permutation, so attention is unchanged. Gemma's norms scale by
(1 + w): the loader stores 1 + w. Another architecture, a variant this model does not implement
(Gemma 2/3, sliding-window attention shorter than the positions, other RoPE scalings, biases
elsewhere) or a missing, unexpected or misshapen tensor raises ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

from flax import nnx
import numpy as np

from nsn_jax.llm import safetensors_io
from nsn_jax.llm.loading import check_unexpected, fill
from nsn_jax.llm.safetensors_io import SafetensorsFiles
from nsn_jax.llm.tokenizer import HFTokenizer
from nsn_jax.models.llama import LlamaConfig, LlamaModel, RopeScaling
from nsn_jax.sharding import Layout

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
# Our (module, name) in block N → the HF module under `model.layers.N.`.
_BLOCK = {
  ("attn", "q"): "self_attn.q_proj",
  ("attn", "k"): "self_attn.k_proj",
  ("attn", "v"): "self_attn.v_proj",
  ("attn", "o"): "self_attn.o_proj",
  ("mlp", "gate"): "mlp.gate_proj",
  ("mlp", "up"): "mlp.up_proj",
  ("mlp", "down"): "mlp.down_proj",
  ("attn_norm",): "input_layernorm",
  ("mlp_norm",): "post_attention_layernorm",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved
_REQUIRED = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
)


def _refuse(key: str, value: Any, supported: str) -> None:
  raise ValueError(f"config.json {key} is {value!r}; LlamaModel implements {supported}.")


def _rope_scaling(config: Mapping) -> RopeScaling | None:
  scaling = config.get("rope_scaling")
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind in (None, "default"):
    return None
  if kind == "linear":
    return RopeScaling("linear", float(scaling["factor"]))
  if kind != "llama3":
    _refuse("rope_scaling.rope_type", kind, "none, linear or llama3")
  fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [field for field in fields if field not in scaling]
  if missing:
    raise ValueError(f"config.json rope_scaling (llama3) lacks {missing}.")
  return RopeScaling("llama3", *(float(scaling[f]) for f in fields[:3]), int(scaling[fields[3]]))


def _check_variant(config: Mapping, family: str) -> None:
  """Refuses what LlamaModel would compute differently from transformers."""
  if config.get("mlp_bias") or (family != "qwen2" and config.get("attention_bias")):
    _refuse("mlp_bias / attention_bias", True, "biases on Qwen2's q/k/v only")
  activation = config.get("hidden_activation") or config.get("hidden_act", "silu")
  expected = "gelu_pytorch_tanh" if family == "gemma" else "silu"
  if activation != expected and not (family == "gemma" and activation == "gelu"):
    _refuse("hidden_act", activation, f"{expected} for {family}")
  if family == "qwen2" and config.get("use_sliding_window"):
    _refuse("use_sliding_window", True, "full attention (use_sliding_window false)")
  if config.get("partial_rotary_factor", 1.0) != 1.0:
    _refuse("partial_rotary_factor", config["partial_rotary_factor"], "RoPE on whole heads (1.0)")


def config_from_hf_decoder(config: Mapping) -> LlamaConfig:
  """The LlamaConfig that a Hugging Face decoder's config.json (as a dict) describes."""
  family = config.get("model_type")
  if family not in FAMILIES:
    raise ValueError(
      f"config.json has model_type {family!r}; supported decoders: {', '.join(FAMILIES)} "
      "(gemma2 / gemma3 add norms and soft-capping LlamaModel does not implement)."
    )
  missing = [key for key in _REQUIRED if key not in config]
  if missing:
    raise ValueError(f"config.json lacks {missing}.")
  _check_variant(config, family)
  heads = config["num_attention_heads"]
  positions = config.get("max_position_embeddings", 2048)
  window = config.get("sliding_window") if family == "mistral" else None
  dim = config["hidden_size"]
  return LlamaConfig(
    vocab_size=config["vocab_size"],
    dim=dim,
    n_layers=config["num_hidden_layers"],
    n_heads=heads,
    n_kv_heads=config.get("num_key_value_heads") or heads,
    ffn_dim=config["intermediate_size"],
    rope_theta=float(config.get("rope_theta", 10000.0)),
    norm_eps=float(config.get("rms_norm_eps", 1e-6)),
    tie_embeddings=bool(config.get("tie_word_embeddings", family == "gemma")),
    max_seq_len=min(positions, window) if window else positions,
    head_dim=config.get("head_dim") or 0,
    qkv_bias=family == "qwen2",
    activation="gelu_tanh" if family == "gemma" else "silu",
    embed_scale=float(np.float32(dim**0.5)) if family == "gemma" else 1.0,
    rope_scaling=_rope_scaling(config),
  )


def to_interleaved(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """HF q/k rows (n_heads·hd, ...) with RoPE pairs (i, i + hd/2) → pairs at (2i, 2i+1)."""
  head = rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:])
  return head.swapaxes(1, 2).reshape(rows.shape)


def to_halves(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `to_interleaved`: our q/k rows back to HF's layout."""
  head = rows.reshape(n_heads, rows.shape[0] // n_heads // 2, 2, *rows.shape[1:])
  return head.swapaxes(1, 2).reshape(rows.shape)


def hf_name(param_path: tuple) -> str:
  """Our parameter path ("layers", 3, "mlp", "up", "kernel") → its HF tensor name."""
  *module, param = param_path
  suffix = "bias" if param == "bias" else "weight"
  if module == ["embed"]:
    return "model.embed_tokens.weight"
  if module == ["norm"]:
    return "model.norm.weight"
  if module == ["lm_head"]:
    return "lm_head.weight"
  return f"model.layers.{module[1]}.{_BLOCK[tuple(module[2:])]}.{suffix}"


def to_ours(param_path: tuple, array: np.ndarray, config: LlamaConfig, gemma: bool) -> np.ndarray:
  """An HF tensor in our layout: kernels transposed, q/k rows interleaved, Gemma norms 1 + w."""
  module, param = param_path[-2], param_path[-1]
  if module in ("q", "k"):
    array = to_interleaved(array, config.n_heads if module == "q" else config.n_kv_heads)
  if param == "kernel":
    return array.T
  if param == "scale" and gemma:
    return 1.0 + array
  return array


def to_hf(param_path: tuple, array: np.ndarray, config: LlamaConfig) -> np.ndarray:
  """The inverse of `to_ours`: one of our parameters in the HF layout."""
  module, param = param_path[-2], param_path[-1]
  if param == "kernel":
    array = array.T
  if param == "scale" and family_of(config) == "gemma":
    array = array - 1.0
  if module in ("q", "k"):
    array = to_halves(array, config.n_heads if module == "q" else config.n_kv_heads)
  return array


def family_of(config: LlamaConfig) -> str:
  """The HF model_type whose config.json reproduces `config`."""
  if config.activation == "gelu_tanh" or config.embed_scale != 1.0:
    return "gemma"
  return "qwen2" if config.qkv_bias else "llama"


def hf_config(config: LlamaConfig) -> dict[str, Any]:
  """config.json for `config`, as transformers reads it."""
  family = family_of(config)
  out = {
    "architectures": [
      {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[
        family
      ]
    ],
    "model_type": family,
    "vocab_size": config.vocab_size,
    "hidden_size": config.dim,
    "intermediate_size": config.ffn_dim,
    "num_hidden_layers": config.n_layers,
    "num_attention_heads": config.n_heads,
    "num_key_value_heads": config.n_kv_heads,
    "head_dim": config.head_dim,
    "max_position_embeddings": config.max_seq_len,
    "rms_norm_eps": config.norm_eps,
    "rope_theta": config.rope_theta,
    "tie_word_embeddings": config.tie_embeddings,
    "hidden_act": "gelu_pytorch_tanh" if family == "gemma" else "silu",
    "torch_dtype": "float32",
  }
  scaling = config.rope_scaling
  if scaling is not None:
    out["rope_scaling"] = {"rope_type": scaling.kind, "factor": scaling.factor}
    if scaling.kind == "llama3":
      out["rope_scaling"] |= {
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max,
      }
  return out


def save_hf_decoder(model: nnx.Module, directory: str | os.PathLike, tokenizer=None) -> None:
  """Writes a dense decoder (a LlamaModel whose projections are all dense: nnx.Linear or folded
  `deploy` DenseForm layers) as config.json + model.safetensors in its family's Hugging Face
  layout, and the tokenizer's files when given (anything with `save(directory)`). Raises
  ValueError naming a layer that is not dense (an NSN layer, a factorised or GAR form)."""
  config = model.config
  tensors = {}
  for param_path, variable in nnx.to_flat_state(nnx.state(model)):
    if param_path[-1] not in ("kernel", "bias", "scale", "embedding"):
      where = "/".join(map(str, param_path[:-1]))
      raise ValueError(
        f"layer {where!r} is not dense ({param_path[-1]!r}); export it with every layer "
        "folded to a dense kernel (deploy form 'dense')."
      )
    tensors[hf_name(param_path)] = to_hf(param_path, np.asarray(variable[...], np.float32), config)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  settings = hf_config(config)
  if tokenizer is not None:  # transformers' generate stops at these, not its class defaults
    eos = list(getattr(tokenizer, "eos_ids", ())) or tokenizer.eos_id
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos}
    settings |= ids
    (directory / "generation_config.json").write_text(json.dumps(ids, indent=2))
    tokenizer.save(directory)
  (directory / "config.json").write_text(json.dumps(settings, indent=2))
  safetensors_io.save(directory / safetensors_io.SINGLE, tensors, {"format": "pt"})


def load_hf_decoder(
  directory: str | os.PathLike, dtype=None, layout: Layout | None = None
) -> tuple[LlamaConfig, LlamaModel, HFTokenizer | None]:
  """Reads a Hugging Face Llama / Mistral / Qwen2 / Gemma directory into a LlamaModel with
  float32 parameters computing in `dtype` (None: float32), with its config and tokenizer (None
  without tokenizer.json). `layout` places each parameter straight into its sharding
  (`nsn_jax.llm.loading.fill`; None: one device); shards are read one tensor at a time."""
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"no config.json in {directory} (a Hugging Face model directory)")
  raw = json.loads(config_path.read_text())
  config = config_from_hf_decoder(raw)
  files = SafetensorsFiles(directory)
  abstract = nnx.eval_shape(lambda: LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
  names = {path: hf_name(path) for path, _ in nnx.to_flat_state(nnx.state(abstract))}
  # Some tied checkpoints also save the shared head.
  tied_head = lambda n: config.tie_embeddings and n == "lm_head.weight"
  ignored = lambda n: n.endswith(_IGNORED_SUFFIXES) or tied_head(n)
  check_unexpected(str(directory), files.names(), names.values(), "LlamaModel", ignored)
  available = set(files.names())

  def tensor(param_path, shape) -> np.ndarray:
    name = names[param_path]
    if name not in available:
      raise ValueError(f"{directory}: tensor {name!r} is missing.")
    theirs = shape[::-1] if param_path[-1] == "kernel" else shape
    if files.shape(name) != theirs:
      raise ValueError(
        f"{directory}: tensor {name!r} has shape {files.shape(name)}, expected {theirs} for "
        f"{'/'.join(map(str, param_path))} of {config}."
      )
    return to_ours(param_path, files.read(name), config, raw["model_type"] == "gemma")

  model = fill(abstract, tensor, layout)
  tokenizer = (
    HFTokenizer.from_directory(directory) if (directory / "tokenizer.json").is_file() else None
  )
  return config, model, tokenizer
