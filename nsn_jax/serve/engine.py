"""The device side of the server: one restored model, its compiled programs, requests → results.

An engine holds every (rank, batch size) program compiled ahead of traffic, checks a request's
JSON into model inputs (`parse`, raising `RequestError` with the HTTP status and one line), and
runs a batch of parsed requests at a rank (`run`, on the server's single device thread). Two
kinds exist, one per model kind the library trains: `Classifier` (image or text classification)
and `Generator` (a language model: prompt → text with the KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import config as config_lib
from nsn_jax import flops
from nsn_jax.build import model_path, text_encoder
from nsn_jax.config import ConfigError
from nsn_jax.data.pipeline import preprocess
from nsn_jax.data.text import encode_texts
from nsn_jax.layers import nsn_layers
from nsn_jax.llm.decode import Decoder, Sampling, default_prompt_buckets
from nsn_jax.llm.gguf import GGUFTokenizer, open_gguf
from nsn_jax.profiles import saved_profiles, summarise
from nsn_jax.restore import Restored, restore_model
from nsn_jax.tasks import get_task

MAX_TEXT_CHARS = 100_000  # per text: longer is refused (413) before it reaches the tokenizer


class RequestError(ValueError):
  """A request the server refuses: `status` (4xx) and a one-line message naming the field."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class Parsed:
  """A checked request: `inputs` for the engine, `rows` it adds to a batch, the `units` of work
  it costs (model.units), and the rank or budget it asked for (None: the policy decides)."""

  inputs: Any
  rows: int
  units: float
  rank: int | None
  budget: float | None


def _field(body: dict, name: str, kind, check: Callable[[Any], bool], valid: str, default=None):
  """body[name] if present, checked: a RequestError(422) naming the field, the value and what is
  valid otherwise. Booleans are not numbers here."""
  if name not in body:
    return default
  value = body[name]
  if isinstance(value, bool) or not isinstance(value, kind) or not check(value):
    raise RequestError(422, f"{name}={json_repr(value)}: valid: {valid}")
  return value


def json_repr(value) -> str:
  """A short rendering of a JSON value for an error message."""
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


class Engine:
  """What both kinds share: served ranks, their costs, budgets → ranks, compiled programs."""

  kind: str
  keys: frozenset  # the JSON fields a request may carry

  def __init__(
    self,
    restored: Restored,
    ranks: Sequence,
    batch_sizes: Sequence[int],
    seq_len: int | None,
    budget_reference: str,
    profiles: Mapping[float, Mapping] | None = None,
  ):
    self.model, self.config, self.step = restored.model, restored.config, restored.step
    self.seq_len, self.budget_reference = seq_len, budget_reference
    self.nested = bool(nsn_layers(self.model))
    self.max_rank = flops.max_rank(self.model) if self.nested else None
    # What a batch can run at ("points"), cheapest first: ints, FlexRank profiles (hashable
    # {layer path: rank} mappings, one budget each) or None for a model without ranks.
    self.profile_budget = {ranks: budget for budget, ranks in (profiles or {}).items()}
    points = (list(self.profile_budget) or list(ranks)) if self.nested else [None]
    self.ranks = tuple(sorted(points, key=self.flops))
    self.batch_sizes = tuple(sorted(batch_sizes))
    self.graphdef, state = nnx.split(self.model)
    # Weights as a flat list: flattening an nnx.State on every call costs more than a small batch.
    self.leaves, self.treedef = jax.tree.flatten(state)
    self._programs: dict[tuple, Any] = {}

  def label(self, point) -> str:
    """A point's name in metrics and logs: the rank, or "profile@<budget>"."""
    return f"profile@{self.profile_budget[point]:g}" if isinstance(point, Mapping) else str(point)

  def describe_point(self, point) -> dict:
    """A point in JSON: its rank (None for a profile or a model without ranks), the profile's
    budget and per-layer rank range, and its FLOPs."""
    record = {"rank": None if isinstance(point, Mapping) else point}
    if isinstance(point, Mapping):
      record["profile"] = {"budget": self.profile_budget[point], "ranks": summarise(point)}
    return {**record, "flops": self.flops(point), "flops_frac_dense": self.flops_frac_dense(point)}

  def flops(self, rank: int | None) -> int:
    """FLOPs of the unit a response reports (an example, or a generated token)."""
    return flops.model_flops(self.model, rank, self.seq_len)

  def flops_frac_dense(self, rank: int | None) -> float:
    return self.flops(rank) / flops.dense_model_flops(self.model, self.seq_len)

  def bucket(self, rows: int) -> int:
    """The smallest compiled batch size that holds `rows`."""
    return next(b for b in self.batch_sizes if b >= rows)

  def programs(self) -> list[tuple[int | None, int]]:
    """Every (rank, batch size) to compile before traffic, largest rank first."""
    return [(r, b) for r in reversed(self.ranks) for b in self.batch_sizes]

  def resolve(self, rank, budget) -> int | None:
    """The rank a request runs at: its own `rank` (a served one), the largest served rank within
    its FLOPs `budget`, or None for the policy to choose."""
    if rank is not None and budget is not None:
      raise RequestError(422, "rank and budget: give one or neither, not both")
    if not self.nested and (rank is not None or budget is not None):
      raise RequestError(422, "rank/budget: this model has no ranks (a dense model or an export)")
    if rank is not None:
      if self.profile_budget:
        raise RequestError(
          422, f"rank={rank}: this server serves FlexRank profiles; valid: a budget"
        )
      if rank not in self.ranks:
        raise RequestError(422, f"rank={rank}: valid: a served rank, one of {list(self.ranks)}")
      return rank
    if budget is None:
      return None
    reference = (
      self.flops(None)
      if self.budget_reference == "max_rank"
      else flops.dense_model_flops(self.model, self.seq_len)
    )
    fitting = [r for r in self.ranks if self.flops(r) <= budget * reference]
    if not fitting:
      cheapest = self.flops(self.ranks[0]) / reference
      raise RequestError(
        422,
        f"budget={budget:g}: valid: a fraction of the {self.budget_reference} model's FLOPs "
        f"in [{cheapest:.4f}, 1] (the cheapest served, {self.label(self.ranks[0])}, costs "
        f"{cheapest:.4f})",
      )
    return fitting[-1]

  def parse_common(self, body: Any) -> tuple[int | None, float | None]:
    """The body as a JSON object with known keys only; (rank, budget) as asked."""
    if not isinstance(body, dict):
      raise RequestError(422, f"body: valid: a JSON object with fields {sorted(self.keys)}")
    unknown = sorted(set(body) - self.keys)
    if unknown:
      raise RequestError(422, f"unknown fields {unknown}: valid fields: {sorted(self.keys)}")
    rank = _field(body, "rank", int, lambda r: True, "an integer served rank")
    budget = _field(
      body, "budget", (int, float), lambda b: 0 < b <= 1, "a fraction of FLOPs in (0, 1]"
    )
    return rank, None if budget is None else float(budget)

  def _program(self, key: tuple, compile_fn: Callable[[], Any]):
    if key not in self._programs:
      self._programs[key] = compile_fn()
    return self._programs[key]


class Classifier(Engine):
  """Images (raw pixel values, as the dataset stores them) or texts → label probabilities."""

  kind = "classify"

  def __init__(
    self, restored: Restored, ranks, batch_sizes, budget_reference="max_rank", profiles=None
  ):
    config = restored.config
    super().__init__(
      restored, ranks, batch_sizes, config_lib.seq_len(config), budget_reference, profiles
    )
    self.task = get_task(config.task)
    self.text = config.task == "text_classification"
    self.encoder = text_encoder(config) if self.text else None
    self.keys = frozenset({"texts" if self.text else "inputs", "rank", "budget"})
    # The library's image model (NSNMLP) flattens each image before its first layer.
    self.input_size = None if self.text else self.model.hidden[0].in_features
    graphdef, treedef, task = self.graphdef, self.treedef, self.task

    def probabilities(leaves, batch, rank):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      return jax.nn.softmax(task.logits(model, batch, rank).astype(jnp.float32), axis=-1)

    self._jit = jax.jit(probabilities, static_argnums=2)

  def flops(self, rank: int | None) -> int:
    """FLOPs per example: a text model's whole forward pass over data.seq_len tokens."""
    return (self.seq_len or 1) * super().flops(rank)

  def _example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    if self.text:
      return {
        "tokens": np.zeros((batch_size, self.seq_len), np.int32),
        "mask": np.ones((batch_size, self.seq_len), bool),
      }
    return {"image": np.zeros((batch_size, self.input_size), np.float32)}

  def compile(self, rank, batch_size: int) -> None:
    example = self._example_batch(batch_size)
    self._program((rank, batch_size), lambda: self._jit.lower(self.leaves, example, rank).compile())

  def parse(self, body: Any, max_rows: int) -> Parsed:
    rank, budget = self.parse_common(body)
    inputs = self._parse_texts(body) if self.text else self._parse_images(body)
    rows = len(next(iter(inputs.values())))
    if rows > max_rows:
      raise RequestError(413, f"{rows} examples: valid: at most {max_rows} per request")
    return Parsed(inputs, rows, 1.0, self.resolve(rank, budget), budget)

  def _parse_images(self, body: dict) -> dict[str, np.ndarray]:
    valid = (
      f"a non-empty list of examples, each {self.input_size} pixel values in [0, 255] "
      "(nested as the image's shape or flat)"
    )
    if "inputs" not in body:
      raise RequestError(422, f"inputs: missing; valid: {valid}")
    try:
      images = np.asarray(body["inputs"], np.float64)
    except (ValueError, TypeError):
      raise RequestError(
        422, f"inputs: not a rectangular array of numbers; valid: {valid}"
      ) from None
    if images.ndim < 2 or len(images) == 0 or math.prod(images.shape[1:]) != self.input_size:
      raise RequestError(422, f"inputs: shape {list(images.shape)}; valid: {valid}")
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255:
      raise RequestError(422, f"inputs: values outside [0, 255] or not finite; valid: {valid}")
    # The dataset's uint8 pixels, preprocessed as training and eval.py preprocess them.
    return preprocess({"image": images.reshape(len(images), -1).astype(np.float32)})

  def _parse_texts(self, body: dict) -> dict[str, np.ndarray]:
    texts = body.get("texts")
    valid = "a non-empty list of strings"
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise RequestError(422, f"texts={json_repr(texts)}: valid: {valid}")
    if max(map(len, texts)) > MAX_TEXT_CHARS:
      raise RequestError(
        413, f"texts: a text of {max(map(len, texts))} characters; valid: at most {MAX_TEXT_CHARS}"
      )
    # Tokenised and cut to data.seq_len exactly as the training and eval pipelines do.
    return encode_texts(texts, self.encoder.encode, self.seq_len, self.encoder.pad_id)

  def run(self, rank, batch_size: int, requests: Sequence[Parsed]) -> tuple[list[dict], float]:
    """Probabilities for each request's rows, one padded batch; (results, units run)."""
    arrays = {key: np.concatenate([r.inputs[key] for r in requests]) for key in requests[0].inputs}
    rows = len(next(iter(arrays.values())))
    padded = {
      k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
      for k, v in arrays.items()
    }
    self.compile(rank, batch_size)  # a no-op once compiled at start-up
    probs = np.asarray(self._programs[(rank, batch_size)](self.leaves, padded))[:rows]
    results, start = [], 0
    for request in requests:
      own = probs[start : start + request.rows]
      start += request.rows
      results.append({"labels": own.argmax(-1).tolist(), "probabilities": own.tolist()})
    return results, 1.0

  def warm_up_request(self, batch_size: int) -> list[Parsed]:
    """A request filling `batch_size` rows, for start-up latency measurements."""
    inputs = self._example_batch(batch_size)
    return [Parsed(inputs, batch_size, 1.0, None, None)]


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
  ):
    if context > restored.model.config.max_seq_len:
      raise ConfigError(
        "--context",
        context,
        f"at most the model's max_seq_len, {restored.model.config.max_seq_len}",
      )
    # FLOPs per generated token are counted at a full context: attention over every slot.
    super().__init__(restored, ranks, batch_sizes, context, budget_reference, profiles)
    self.tokenizer = GGUFTokenizer.from_reader(open_gguf(model_path(restored.config)))
    # Rows of a batch share the cache's write index, so any prompt must fit beside any request's
    # new tokens: prompts get what --max_new_tokens leaves of the context.
    self.max_new_tokens, self.max_prompt = max_new_tokens, context - max_new_tokens
    self.decoder = Decoder(self.model, context, default_prompt_buckets(self.max_prompt + 1))

  def compile(self, rank, batch_size: int) -> None:
    self.decoder.compile(rank, batch_size)

  def parse(self, body: Any, max_rows: int) -> Parsed:
    del max_rows  # one prompt per request
    rank, budget = self.parse_common(body)
    prompt = _field(
      body,
      "prompt",
      str,
      lambda p: 0 < len(p) <= MAX_TEXT_CHARS,
      f"a non-empty string of at most {MAX_TEXT_CHARS} characters",
    )
    if prompt is None:
      raise RequestError(422, "prompt: missing; valid: a non-empty string")
    cap = self.max_new_tokens
    new = _field(
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
    completions = self.decoder.generate(
      [i["tokens"] for i in inputs],
      max_new_tokens=[i["max_new_tokens"] for i in inputs],
      rank=rank,
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
    inputs = {"tokens": [0] * 8, "max_new_tokens": 4, "sampling": Sampling(), "stop": []}
    return [Parsed(inputs, 1, 5.0, None, None)] * batch_size


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


def load_engine(options) -> Engine:
  """The engine for `options.path`'s checkpoint (a ServeOptions): restored, ranks checked."""
  restored = restore_model(options.path, step=options.step)
  model = restored.model
  ranks = options.ladder(flops.max_rank(model) if nsn_layers(model) else None)
  profiles = saved_profiles(restored.metadata) if options.profiles else None
  common = dict(budget_reference=options.budget_reference, profiles=profiles)
  sizes = options.compiled_batch_sizes()
  if restored.config.task == "language_modelling":
    return Generator(
      restored,
      ranks,
      sizes,
      context=options.context,
      max_new_tokens=options.max_new_tokens,
      **common,
    )
  return Classifier(restored, ranks, sizes, **common)
