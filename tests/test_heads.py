"""The sequence classifier on a decoder backbone, and whole-forward FLOPs of sequence models."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsn_jax import flops
from nsn_jax.models.heads import SequenceClassifier
from nsn_jax.models.llama import LlamaConfig, LlamaModel
from nsn_jax.surgery import decompose_and_replace

CONFIG = LlamaConfig(
  vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, max_seq_len=64
)


@pytest.fixture(scope="module")
def nsn_decoder():
  return decompose_and_replace(LlamaModel(CONFIG, rngs=nnx.Rngs(0)), max_rank=64)[0]


def _tokens(batch, length, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length)), jnp.int32
  )


def test_encode_is_the_decoder_without_its_head(nsn_decoder):
  tokens = _tokens(2, 12)
  logits, _ = nnx.jit(lambda m, t: m(t, rank=16))(nsn_decoder, tokens)
  hidden = nnx.jit(lambda m, t: m.encode(t, t >= 0, rank=16))(nsn_decoder, tokens)
  np.testing.assert_allclose(nsn_decoder.embed.attend(hidden), logits, rtol=1e-5, atol=1e-5)


def test_classifier_ignores_right_padding(nsn_decoder):
  classifier = SequenceClassifier(nsn_decoder, 3, rngs=nnx.Rngs(1))
  forward = nnx.jit(lambda m, t, k: m(t, k, rank=8))
  short = _tokens(1, 7)
  padded = jnp.concatenate([short, jnp.zeros((1, 5), jnp.int32)], axis=1)
  mask = jnp.arange(12)[None] < 7
  np.testing.assert_allclose(
    forward(classifier, padded, mask), forward(classifier, short, jnp.ones((1, 7), bool)), atol=1e-5
  )


@pytest.mark.parametrize("rank", [8, 64])
def test_whole_forward_flops_match_xla_up_to_elementwise_work(nsn_decoder, rank):
  """Analytic = every matmul (projections at `rank`, attention over T, the tied head); XLA also
  counts norms, RoPE, softmax and activations: a few percent at this size, never less."""
  t = 32
  classifier = SequenceClassifier(nsn_decoder, 3, rngs=nnx.Rngs(1))
  for model, call in (
    (nsn_decoder, lambda m, x: m(x, rank=rank)[0]),
    (classifier, lambda m, x: m(x, x >= 0, rank=rank)),
  ):
    program = jax.jit(lambda state, x: call(nnx.merge(nnx.graphdef(model), state), x))
    counted = program.lower(nnx.state(model), _tokens(2, t)).compile().cost_analysis()["flops"]
    analytic = 2 * t * flops.model_flops(model, rank, seq_len=t)
    assert analytic <= counted <= 1.05 * analytic, (type(model).__name__, counted / analytic)


def test_context_flops_need_seq_len_and_enter_budgets(nsn_decoder):
  with pytest.raises(ValueError, match="seq_len"):
    flops.model_flops(nsn_decoder, 8)
  short, long = (flops.rank_for_budget(nsn_decoder, 0.8, "dense", seq_len=t) for t in (8, 64))
  assert long < short  # more context: attention's fixed cost leaves less for the projections
