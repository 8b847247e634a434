"""The server's generation endpoint on a language model fine-tuned here (conftest's lm_run: the
tiny GGUF Llama with configs/smollm2_lm.py:smoke), over real HTTP: ranks, budgets, sampling,
stop strings, batching, and the refusals, against the same checkpoint decoded in-process."""

import threading

import pytest
from test_serve import call, start_server, stop_server, wait_ready

from nsn_jax import flops
from nsn_jax.build import model_path
from nsn_jax.llm.decode import Decoder, Sampling, default_prompt_buckets
from nsn_jax.llm.gguf import GGUFTokenizer, gguf_metadata
from nsn_jax.restore import restore_model

CONTEXT, MAX_NEW = 32, 8  # KV slots, the most new tokens: prompts get up to 24 tokens


@pytest.fixture(scope="module")
def server(lm_run, tmp_path_factory):
  process, port = start_server(
    lm_run[0],
    tmp_path_factory.mktemp("server"),
    "--ranks=2,8",
    "--max_batch=2",
    "--batch_sizes=2",
    f"--context={CONTEXT}",
    f"--max_new_tokens={MAX_NEW}",
    "--max_wait_ms=300",  # two requests sent together share a batch
  )
  wait_ready(port, process)
  yield port
  code, err = stop_server(process)
  assert code == 0, err[-2000:]


@pytest.fixture(scope="module")
def local(lm_run):
  """(decoder, tokenizer, model) of the same checkpoint, as eval.py restores it."""
  restored = restore_model(lm_run[0])
  tokenizer = GGUFTokenizer.from_metadata(gguf_metadata(model_path(restored.config)))
  decoder = Decoder(restored.model, CONTEXT, default_prompt_buckets(CONTEXT - MAX_NEW + 1))
  return decoder, tokenizer, restored.model


def expected(local, prompt, rank, new=8, **kw):
  decoder, tokenizer, _ = local
  (done,) = decoder.generate(
    [tokenizer.encode(prompt)], new, rank, eos_id=tokenizer.eos_id, tokenizer=tokenizer, **kw
  )
  return done


def test_generation_at_a_rank_equals_the_checkpoint_decoded_locally(server, local):
  status, info, _ = call(server, "/v1/model")
  assert info["kind"] == "generate" and [r["rank"] for r in info["ranks"]] == [2, 8]
  for rank in (2, 8):
    status, reply, _ = call(
      server, "/v1/generate", {"prompt": "hello the", "max_new_tokens": 8, "rank": rank}
    )
    assert status == 200, reply
    want = expected(local, "hello the", rank)
    assert (reply["tokens"], reply["text"]) == (want.tokens, want.text)
    assert reply["finish_reason"] == want.finish_reason and reply["rank"] == rank
    assert reply["flops"] == flops.model_flops(local[2], rank, CONTEXT)  # per token
  # No rank: the fixed policy's R. A budget: the largest served rank that fits.
  assert call(server, "/v1/generate", {"prompt": "abc"})[1]["rank"] == 8
  fraction = flops.model_flops(local[2], 2, CONTEXT) / flops.model_flops(local[2], None, CONTEXT)
  assert call(server, "/v1/generate", {"prompt": "abc", "budget": fraction})[1]["rank"] == 2


def test_sampling_and_stop_strings_are_per_request(server, local):
  body = {"prompt": "the", "max_new_tokens": 8, "temperature": 5.0, "seed": 3, "rank": 8}
  first, again = (call(server, "/v1/generate", body)[1] for _ in range(2))
  assert first["tokens"] == again["tokens"]
  want = expected(local, "the", 8, new=8, sampling=Sampling(temperature=5.0, seed=3))
  assert first["tokens"] == want.tokens
  other = call(server, "/v1/generate", {**body, "seed": 4})[1]
  assert other["tokens"] != first["tokens"]
  stop = first["text"][2:4]
  cut = call(server, "/v1/generate", {**body, "stop": stop})[1]
  assert cut["finish_reason"] == "stop" and cut["text"] == first["text"][: first["text"].find(stop)]


def test_concurrent_prompts_share_a_batch_and_keep_their_own_answers(server, local):
  prompts = ["hello the abc", "k"]
  replies = [None, None]

  def ask(i):
    replies[i] = call(server, "/v1/generate", {"prompt": prompts[i], "rank": 8})[1]

  threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  for prompt, reply in zip(prompts, replies):
    assert reply["batch_size"] == 2
    assert reply["tokens"] == expected(local, prompt, 8, new=8).tokens


@pytest.mark.parametrize(
  "body,status,message",
  [
    ({}, 422, "prompt: missing"),
    ({"prompt": ""}, 422, "prompt=''"),
    ({"prompt": 3}, 422, "prompt=3"),
    ({"prompt": "a", "max_new_tokens": 0}, 422, "max_new_tokens=0: valid: an integer in 1..8"),
    ({"prompt": "a", "max_new_tokens": 9}, 422, "max_new_tokens=9"),
    ({"prompt": "a", "temperature": -1}, 422, "temperature"),
    ({"prompt": "a", "top_p": 0}, 422, "top_p"),
    ({"prompt": "a", "top_k": 1.5}, 422, "top_k"),
    ({"prompt": "a", "top_k": 3_000_000_000}, 422, "top_k"),
    ({"prompt": "a", "temperature": 10**400}, 422, "temperature"),
    ({"prompt": "a\ud800"}, 422, "body: unusable"),
    ({"prompt": "a", "seed": "x"}, 422, "seed='x'"),
    ({"prompt": "a", "stop": [""]}, 422, "stop=['']"),
    ({"prompt": "a", "stop": 5}, 422, "stop=5"),
    ({"prompt": "a", "rank": 4}, 422, "rank=4: valid: a served rank, one of [2, 8]"),
    ({"prompt": "a", "temprature": 1}, 422, "unknown fields ['temprature']"),
    ({"prompt": "hello " * 30}, 413, "valid: at most 24"),
  ],
)
def test_bad_generation_requests_get_a_4xx(server, body, status, message):
  got, reply, _ = call(server, "/v1/generate", body)
  assert got == status and message in reply["error"], reply
  assert call(server, "/healthz")[0] == 200
