"""The generator engine: a language model's prompt → continuation at a rank (KV cache)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nsn_jax.build import tokenizer
from nsn_jax.config import ConfigError
from nsn_jax.llm.decode import Decoder, Sampling, default_prompt_buckets
from nsn_jax.restore import Restored
from nsn_jax.serve.engine import MAX_TEXT_CHARS, Engine, Parsed, RequestError, field, json_repr

_GENERATE_KEYS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


class Generator(Engine):
  """A language model: a prompt → its continuation at a rank, KV-cached, sampled, stop-aware.

  A request is one prompt (one row); a batch decodes its prompts together, each with its own
  sampling settings, stop strings and token limit. One unit of work is one decoder call (the
  prefill or one new token), so latency per unit is per-token latency.
  """

  kind = "generate"
  keys = frozenset({*_GENERATE_KEYS, "rank", "budget"})

  def __init__(
    self,
    restored: Restored,
    ranks,
    batch_sizes,
    *,
    context: int,
    max_new_tokens: int,
    budget_reference: str = "max_rank",
    profiles=None,
    store=None,
  ):
    if context > restored.model.config.max_seq_len:
      raise ConfigError(
        "--context",
        context,
        f"at most the model's max_seq_len, {restored.model.config.max_seq_len}",
      )
    # FLOPs per generated token are counted at a full context: attention over every slot.
    super().__init__(restored, ranks, batch_sizes, context, budget_reference, profiles, store=store)
    self.tokenizer = tokenizer(restored.config)
    # Rows of a batch share the cache's write index, so any prompt must fit beside any request's
    # new tokens: prompts get what --max_new_tokens leaves of the context.
    self.max_new_tokens, self.max_prompt = max_new_tokens, context - max_new_tokens
    buckets = default_prompt_buckets(self.max_prompt + 1)
    self.decoders = {
      p: Decoder(self.fixed_model(p), context, buckets, self._point_compiler(p)) for p in self.ranks
    }

  def _point_compiler(self, point):
    """The engine's compiler with the point in each program's name: every point's fixed model
    runs at rank None, so the decoder's own names would collide."""
    return lambda name, lower: self.compiler(f"{self.label(point)}-{name}", lower)

  def compile(self, rank, batch_size: int) -> None:
    self.decoders[rank].compile(None, batch_size)

  def parse(self, body: Any, max_rows: int) -> Parsed:
    del max_rows  # one prompt per request
    rank, budget = self.parse_common(body)
    prompt = field(
      body,
      "prompt",
      str,
      lambda p: 0 < len(p) <= MAX_TEXT_CHARS,
      f"a non-empty string of at most {MAX_TEXT_CHARS} characters",
    )
    if prompt is None:
      raise RequestError(422, "prompt: missing; valid: a non-empty string")
    cap = self.max_new_tokens
    new = field(
      body, "max_new_tokens", int, lambda n: 1 <= n <= cap, f"an integer in 1..{cap}", min(32, cap)
    )
    tokens = self.tokenizer.encode(prompt)
    if len(tokens) > self.max_prompt:
      raise RequestError(
        413,
        f"prompt of {len(tokens)} tokens: valid: at most {self.max_prompt} (the server's "
        "--context minus --max_new_tokens)",
      )
    inputs = {
      "tokens": tokens,
      "max_new_tokens": new,
      "sampling": _sampling(body),
      "stop": _stop_strings(body),
    }
    return Parsed(inputs, 1, 1.0 + new, self.resolve(rank, budget), budget)

  def run(self, rank, batch_size: int, requests: Sequence[Parsed]) -> tuple[list[dict], float]:
    inputs = [r.inputs for r in requests]
    completions = self.decoders[rank].generate(
      [i["tokens"] for i in inputs],
      max_new_tokens=[i["max_new_tokens"] for i in inputs],
      rank=None,  # the point's own fixed-rank model
      sampling=[i["sampling"] for i in inputs],
      eos_id=self.tokenizer.eos_id,
      stop=[i["stop"] for i in inputs],
      tokenizer=self.tokenizer,
      batch_size=batch_size,
    )
    results = [
      {
        "text": c.text,
        "tokens": c.tokens,
        "finish_reason": c.finish_reason,
        "prompt_tokens": len(i["tokens"]),
      }
      for c, i in zip(completions, inputs)
    ]
    return results, 1.0 + max(len(c.tokens) for c in completions)

  def warm_up_request(self, batch_size: int) -> list[Parsed]:
    """A full batch of 8-token prompts asking for 2 tokens: the prefill and one decode step,
    the two programs whose per-unit latency the policy predicts from."""
    new = min(2, self.max_new_tokens)
    prompt = [0] * min(8, self.max_prompt)
    inputs = {"tokens": prompt, "max_new_tokens": new, "sampling": Sampling(), "stop": []}
    return [Parsed(inputs, 1, 1.0 + new, None, None)] * batch_size


def _sampling(body: dict):
  fields = {k: body[k] for k in ("temperature", "top_k", "top_p", "seed") if k in body}
  for name, value in fields.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise RequestError(422, f"{name}={json_repr(value)}: valid: a number")
  try:
    return Sampling(**fields)
  except (TypeError, ValueError) as e:
    raise RequestError(422, str(e)) from None


def _stop_strings(body: dict) -> list[str]:
  stop = body.get("stop", [])
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > 8 or not all(isinstance(s, str) and s for s in stop):
    raise RequestError(
      422,
      f"stop={json_repr(body.get('stop'))}: valid: a string or a list of at most 8 "
      "non-empty strings",
    )
  return stop
