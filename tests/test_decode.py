"""Batched, sampled, stop-aware decoding (nsn_jax.llm.decode) on the tiny random Llama.

Most tests share one Decoder at batch size 3 and prompt bucket 8, so its two programs compile
once for the file.
"""

import contextlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_llama import TINY, tiny_model

from nsn_jax.llm.decode import (
  Decoder,
  Sampling,
  SamplingArrays,
  default_prompt_buckets,
  generate,
  sample,
)

PROMPTS = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 13], [1, 2, 3, 4, 5]]  # lengths 3, 7, 5: bucket 8
HOT = dict(temperature=3.0)  # flat enough on the random model that seeds visibly differ
LETTERS = "".join(chr(c) for c in range(ord("A"), ord("A") + TINY.vocab_size))


class Letters:
  """A tokenizer for stop strings: id i is the character LETTERS[i]."""

  def decode(self, ids):
    return "".join(LETTERS[i] for i in ids)


@pytest.fixture(scope="module")
def model():
  return tiny_model()


@pytest.fixture(scope="module")
def decoder(model):
  return Decoder(model, slots=16, prompt_buckets=(4, 8))


@pytest.fixture(scope="module")
def greedy_long(model):
  """Each prompt's 11 greedy tokens by repeated full forward passes, no cache, no padding."""
  forward = nnx.jit(lambda m, t: m(t)[0])
  out = []
  for prompt in PROMPTS:
    # One (1, 24) buffer for every length: causal attention never reads the zeros after t.
    sequence = np.zeros((1, 24), np.int32)
    sequence[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + 11):
      sequence[0, t] = int(jnp.argmax(forward(model, jnp.asarray(sequence))[0, t - 1]))
    out.append(sequence[0, len(prompt) : len(prompt) + 11].tolist())
  return out


@pytest.fixture(scope="module")
def greedy(greedy_long):
  """Each prompt's first 6 greedy tokens."""
  return [g[:6] for g in greedy_long]


@contextlib.contextmanager
def count_compiles():
  """Yields a list that collects one entry per XLA compilation inside the block."""
  events = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_left_padded_rows_have_the_logits_of_unpadded_ones(model):
  forward = nnx.jit(lambda m, t, s: m(t, starts=s)[0])
  tokens = np.asarray([[0, 0, 0, *PROMPTS[2], 6], [*PROMPTS[1], 2, 3]], np.int32)  # (2, 9)
  padded = forward(model, tokens, jnp.asarray([3, 0], jnp.int32))
  alone = forward(model, tokens[:1, 3:], jnp.zeros(1, jnp.int32))  # no padding at all
  assert np.isfinite(padded).all()  # padding rows see themselves: no NaN leaks out
  np.testing.assert_allclose(padded[0, 3:], alone[0], atol=1e-5)
  tokens[0, :3] = 9  # what fills the padding is never read
  refilled = forward(model, tokens, jnp.asarray([3, 0], jnp.int32))
  np.testing.assert_array_equal(refilled[0, 3:], padded[0, 3:])


def test_batched_greedy_equals_each_prompt_alone(decoder, model, greedy, greedy_long):
  batched = decoder.generate(PROMPTS, 6)
  assert [c.tokens for c in batched] == greedy
  assert all(c.finish_reason == "length" and c.text is None for c in batched)
  alone = [decoder.generate([p], 6)[0].tokens for p in PROMPTS]  # batch 1, buckets 4 and 8
  assert alone == greedy
  # 5 + 11 tokens fill the 16 slots although the prompt's bucket is 8: the prefill moves the
  # bucket's padding out of the cache.
  assert decoder.generate([PROMPTS[2]], 11)[0].tokens == greedy_long[2]
  assert generate(model, PROMPTS[0], 6) == greedy[0]  # the one-prompt wrapper, no padding
  assert generate(model, PROMPTS[0], 6, eos_id=greedy[0][1]) == greedy[0][:2]  # eos kept


def test_per_row_lengths_eos_and_padding_rows(decoder, greedy):
  eos = greedy[1][2]
  out = decoder.generate(PROMPTS[:2], [2, 6], eos_id=eos, batch_size=3)
  cut = greedy[1][: greedy[1].index(eos)]
  assert out[0].tokens == greedy[0][:2] and out[0].finish_reason == "length"
  assert out[1].tokens == cut and out[1].finish_reason == "eos"  # eos itself is left out


def test_stop_strings_cut_the_text(decoder, greedy):
  text = Letters().decode(greedy[2])
  out = decoder.generate(PROMPTS, 6, stop=["#", text[1:3]], tokenizer=Letters())
  assert out[2].text == text[:1] and out[2].finish_reason == "stop"
  assert out[2].tokens == greedy[2][:3]  # up to the token that completed the stop string
  own = decoder.generate(PROMPTS, 6, stop=[[], [], [text[1:3]]], tokenizer=Letters())
  assert own[2] == out[2] and own[0].finish_reason == own[1].finish_reason == "length"
  assert out[0].text == Letters().decode(greedy[0]) and out[0].finish_reason == "length"


def test_streamed_tokens_are_each_rows_completion_as_it_arrives(decoder, greedy):
  streamed = []
  eos = greedy[1][2]
  out = decoder.generate(PROMPTS, 6, eos_id=eos, on_token=lambda row, t: streamed.append((row, t)))
  for row, completion in enumerate(out):
    assert [t for r, t in streamed if r == row] == completion.tokens  # EOS never streamed
  steps = [t for r, t in streamed if r == 0]
  assert streamed[:3] == [(0, steps[0]), (1, greedy[1][0]), (2, greedy[2][0])]  # step by step


def test_sampling_is_seeded_per_row_and_greedy_when_cold(decoder, greedy):
  def run(*samplings, prompts=PROMPTS):
    return [c.tokens for c in decoder.generate(prompts, 6, sampling=list(samplings))]

  cold, top1, hot = Sampling(), Sampling(top_k=1, seed=5, **HOT), Sampling(seed=1, **HOT)
  first = run(cold, top1, hot)
  assert first[:2] == greedy[:2]  # temperature 0, and top_k = 1 at any temperature
  assert first[2] != greedy[2]
  # A row's draws depend on its seed and step only, not on its neighbours or its place.
  again = run(hot, Sampling(seed=2, **HOT), cold, prompts=[PROMPTS[2], PROMPTS[0], PROMPTS[1]])
  assert again[0] == first[2] and again[2] == greedy[1]
  same_prompt = run(hot, hot, Sampling(seed=2, **HOT), prompts=[PROMPTS[2]] * 3)
  assert same_prompt[0] == same_prompt[1] == first[2] and same_prompt[2] != first[2]


def test_sample_keeps_to_top_k_and_top_p():
  rows = 512
  probs = np.asarray([0.4, 0.3, 0.2, 0.06, 0.04])
  logits = jnp.tile(jnp.log(jnp.asarray(probs, jnp.float32)), (rows, 1))
  draw = jax.jit(sample)

  def drawn(**kw):
    settings = [Sampling(temperature=1.0, seed=s, **kw) for s in range(rows)]
    return np.asarray(draw(logits, jnp.int32(3), SamplingArrays.of(settings, rows)))

  assert set(drawn(top_k=2)) == {0, 1}
  assert set(drawn(top_p=0.65)) == {0, 1}  # 0.4 + 0.3 reaches 0.65
  assert set(drawn(top_k=4, top_p=0.95)) == {0, 1, 2, 3}
  counts = np.bincount(drawn(), minlength=5) / rows
  np.testing.assert_allclose(counts, probs, atol=0.06)


def test_compile_ahead_then_generate_never_compiles(decoder):
  decoder.compile(None, 3)  # adds the bucket-4 prefill at batch 3
  with count_compiles() as compiles:
    decoder.generate([[1, 2], [3]], 4, batch_size=3, sampling=Sampling(seed=3, top_p=0.9, **HOT))
    decoder.generate(PROMPTS, [1, 7, 3], eos_id=0)
  assert compiles == []
  assert default_prompt_buckets(64) == (8, 16, 32, 63)
  assert default_prompt_buckets(5) == (4,)


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1], []]), "prompt 1 must be a non-empty"),
    (dict(prompts=[[1, 50]]), r"token id 50 outside \[0, vocab_size=50\)"),
    (dict(prompts=[[1] * 9]), "longer than the largest prompt bucket 8"),
    (dict(max_new_tokens=14), r"longest prompt \(3\) \+ largest max_new_tokens \(14\)"),
    (dict(max_new_tokens=0), "max_new_tokens must be integers >= 1"),
    (dict(prompts=[[1], [2]], batch_size=1), "batch_size=1 is smaller than the 2 prompts"),
    (dict(stop=["x"]), "need a tokenizer"),
    (dict(rank=2.5), "rank None, an int or a profile"),
  ],
)
def test_bad_requests_fail_in_one_line(decoder, kwargs, message):
  request = dict(prompts=[PROMPTS[0]], max_new_tokens=2) | kwargs
  with pytest.raises(ValueError, match=message):
    decoder.generate(**request)


@pytest.mark.parametrize(
  "field,value", [("temperature", -1.0), ("temperature", float("inf")), ("top_k", -1), ("top_p", 0)]
)
def test_bad_sampling_names_the_field(field, value):
  with pytest.raises(ValueError, match=rf"Sampling\.{field}=.*must be"):
    Sampling(**{field: value})


def test_decoder_sizes_are_checked(model):
  with pytest.raises(ValueError, match="max_seq_len=64"):
    Decoder(model, slots=65)
  with pytest.raises(ValueError, match="prompt_buckets"):
    Decoder(model, slots=16, prompt_buckets=(16,))
