"""Batched, sampled, stop-aware decoding with a KV cache and static shapes: what a server runs.

  decoder = Decoder(model, slots=512)
  decoder.compile(rank=288, batch_size=8)  # every program generate() can need, ahead of time
  done = decoder.generate(prompts, 64, rank=288, sampling=Sampling(temperature=0.7, top_p=0.9))

Shapes never depend on a request. A batch's prompts are left-padded (right-aligned) to the
smallest prompt bucket P that holds the longest, and to batch_size rows; per-row `starts` keep
the padding out of attention and start each row's RoPE positions at 0, so a row decodes exactly
as it would alone. One prefill program per bucket and one decode-step program serve every
request at a (rank, batch_size); sampling settings and max_new_tokens are data, never shapes.
Each rank is static (its own programs, real FLOP savings at low rank).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax.layers import Rank, effective_rank, is_static_rank
from nsn_jax.models.llama import KVCache, LlamaModel


def _finite(x) -> bool:
  """A finite real number (a huge Python int, which math.isfinite cannot convert, is not)."""
  try:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  except OverflowError:
    return False


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How one row picks its next token: temperature, then top-k, then nucleus (top-p).

  temperature 0 is greedy (argmax) and ignores the rest. A row's random key is
  fold_in(key(seed), step): the same seed gives the same tokens whatever else is in the batch.
  """

  temperature: float = 0.0
  top_k: int = 0  # 0 = every token
  top_p: float = 1.0  # 1 = every token
  seed: int = 0

  def __post_init__(self):
    checks = [
      ("temperature", _finite(self.temperature) and self.temperature >= 0, "a finite >= 0"),
      ("top_k", _is_int(self.top_k) and 0 <= self.top_k < 2**31, "an int32 >= 0 (0 = off)"),
      ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
      ("seed", _is_int(self.seed) and 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
    ]
    for name, ok, valid in checks:
      if not ok:
        raise ValueError(f"Sampling.{name}={getattr(self, name)!r}: must be {valid}.")


@dataclasses.dataclass(frozen=True)
class Completion:
  """One prompt's continuation.

  tokens: the generated ids, eos_id excluded; with a stop string, every id up to the one that
    completed it (a stop string may end inside a token, so only the text is cut).
  text: tokenizer.decode(tokens), or for "stop" the text before the stop string; None without
    a tokenizer.
  finish_reason: "eos", "stop" or "length" (max_new_tokens reached).
  """

  tokens: list[int]
  text: str | None
  finish_reason: str


def default_prompt_buckets(slots: int) -> tuple[int, ...]:
  """Powers of two from 8 below slots − 1, then slots − 1 (the longest prompt that leaves room
  for one new token): at most 2× padding, one prefill program per bucket."""
  buckets = [p for p in (2**i for i in range(3, 32)) if p < slots - 1]
  return (*buckets, slots - 1)


class Weights(NamedTuple):
  """A model as its graph and a flat list of arrays: JAX would flatten an nnx.State argument in
  Python on every call, which costs more than a decode step or a small batch."""

  graphdef: nnx.GraphDef
  treedef: Any
  leaves: list

  @classmethod
  def of(cls, model: nnx.Module) -> Weights:
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    return cls(graphdef, treedef, leaves)


class Decoder:
  """Generates for batches of prompts from one model, with a KV cache of `slots` positions.

  A batch needs (its longest prompt) + (its largest max_new_tokens) ≤ slots: all rows share
  the cache's write index. The weights are those of `model` when the Decoder is made.
  """

  def __init__(
    self,
    model: LlamaModel,
    slots: int,
    prompt_buckets: Sequence[int] | None = None,
    compiler: Callable[[str, Callable[[], jax.stages.Lowered]], Any] | None = None,
  ) -> None:
    config = model.config
    if not (_is_int(slots) and 2 <= slots <= config.max_seq_len):
      raise ValueError(
        f"Decoder slots={slots!r} (prompt + new tokens): must be an integer in [2, "
        f"max_seq_len={config.max_seq_len}]."
      )
    buckets = default_prompt_buckets(slots) if prompt_buckets is None else prompt_buckets
    buckets = tuple(sorted({int(p) for p in buckets}))
    if not buckets or buckets[0] < 1 or buckets[-1] > slots - 1:
      raise ValueError(
        f"Decoder prompt_buckets={prompt_buckets!r}: need at least one, each in [1, slots - 1 = "
        f"{slots - 1}]."
      )
    self.model, self.slots, self.prompt_buckets = model, slots, buckets
    # (program name, lower) → executable; a server passes one that keeps executables on disk.
    self.compiler = compiler or compile_now
    # The weights travel as a flat list of arrays, once per token (docs/benchmarks.md).
    self._graphdef, self._treedef, self._leaves = Weights.of(model)
    # Programs depend on the model's structure, not its values: Decoders of one model (the
    # one-prompt `generate` makes one per call) share them.
    structure = (self._graphdef, self._treedef, _avals(self._leaves), slots)
    self._programs = _PROGRAMS.setdefault(structure, {})

  def compile(self, rank: Rank, batch_size: int) -> None:
    """Compiles ahead of time every program generate() at this rank and batch_size can need:
    one prefill per prompt bucket and the decode step. Compiled programs are kept."""
    static_rank = _static_rank(rank)
    if not _is_int(batch_size) or batch_size < 1:
      raise ValueError(f"compile batch_size={batch_size!r}: must be an integer >= 1.")
    for bucket in self.prompt_buckets:
      self._program("prefill", static_rank, batch_size, bucket)
    self._program("step", static_rank, batch_size)

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    rank: Rank = None,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    eos_id: int | Sequence[int] | None = None,
    stop: Sequence[str] | Sequence[Sequence[str]] = (),
    tokenizer: Any = None,
    batch_size: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
  ) -> list[Completion]:
    """One Completion per prompt (token ids); max_new_tokens and sampling are one for all or
    one per prompt. Rows stop at eos_id (one id or several), at a stop string (needs
    `tokenizer`, anything with decode(ids) → str) or at their max_new_tokens; the batch stops
    when every row has. `stop` is one list of strings for every row, or one list per prompt.
    `on_token(row, token)` is called for each token of a row's text as it arrives (streaming).
    """
    request = _Request.check(self, prompts, max_new_tokens, sampling, stop, tokenizer, batch_size)
    static_rank = _static_rank(rank)
    batch = request.batch_size
    bucket = next(p for p in self.prompt_buckets if p >= request.longest)
    tokens, starts = _left_pad(request.prompts, bucket, batch)
    params = SamplingArrays.of(request.samplings, batch)
    rows = [
      _Row(n, eos_id, stop, tokenizer) for n, stop in zip(request.max_new_tokens, request.stops)
    ]
    steps = max(request.max_new_tokens)
    prefill = self._program("prefill", static_rank, batch, bucket)
    step = self._program("step", static_rank, batch) if steps > 1 else None
    params = jax.device_put(params)  # once, not once per step
    token, cache = prefill(self._leaves, tokens, starts, params)
    # The prefill moved the prompts to the front of the cache.
    starts = jax.device_put(starts - starts.min())
    for i in range(steps):
      current = token
      # Dispatch step i + 1 before reading step i's tokens: the device computes while the host
      # checks stops (one step is wasted when every row has just finished).
      if i + 1 < steps:
        token, cache = step(self._leaves, current, cache, starts, np.int32(i + 1), params)
      for index, (row, t) in enumerate(zip(rows, np.asarray(current).tolist())):
        if row.add(t) and on_token is not None:
          on_token(index, t)
      if all(row.finish_reason for row in rows):
        break
    return [row.completion() for row in rows]

  def programs(self, rank: Rank, batch_size: int) -> dict[str, tuple[Callable, tuple]]:
    """{name: (jitted function, abstract arguments)} of every program `compile` compiles at
    this rank and batch size: what `jax.export` takes to lower them for another platform."""
    static_rank = _static_rank(rank)
    kinds = [("prefill", bucket) for bucket in self.prompt_buckets] + [("step", 0)]
    return {
      _name(kind, static_rank, batch_size, bucket, self.slots): self._jitted(
        kind, static_rank, batch_size, bucket
      )
      for kind, bucket in kinds
    }

  def _jitted(self, kind: str, static_rank, batch: int, bucket: int) -> tuple[Callable, tuple]:
    """The prefill (of a bucket) or decode step as (jitted function, abstract arguments)."""
    statics = (self._graphdef, self._treedef, static_rank)
    ids = jax.ShapeDtypeStruct((batch,), jnp.int32)
    params = SamplingArrays.shapes(batch)
    if kind == "prefill":
      tokens = jax.ShapeDtypeStruct((batch, bucket), jnp.int32)
      fn = jax.jit(functools.partial(_prefill, *statics, self.slots))
      return fn, (self._leaves, tokens, ids, params)
    # Donating the cache updates it in place; CPU cannot donate (and would warn).
    donate = () if jax.default_backend() == "cpu" else (2,)
    fn = jax.jit(functools.partial(_step, *statics), donate_argnums=donate)
    cache = jax.eval_shape(lambda: KVCache.init(self.model.config, batch, self.slots))
    step = jax.ShapeDtypeStruct((), jnp.int32)
    return fn, (self._leaves, ids, cache, ids, step, params)

  def _program(self, kind: str, static_rank, batch: int, bucket: int = 0):
    """The compiled prefill (of a bucket) or decode step at a static rank and batch size."""
    key = (kind, static_rank, batch, bucket)
    if key not in self._programs:
      fn, args = self._jitted(kind, static_rank, batch, bucket)
      name = _name(kind, static_rank, batch, bucket, self.slots)
      self._programs[key] = self.compiler(name, lambda: fn.lower(*args))
    return self._programs[key]


def _name(kind: str, static_rank, batch: int, bucket: int, slots: int) -> str:
  return f"{kind}-rank{static_rank}-batch{batch}-prompt{bucket}-slots{slots}"


def compile_now(name: str, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
  """The default `Decoder.compiler`: lower and compile (`name` is for compilers that store)."""
  del name
  return lower().compile()


# Model structure → {(kind, rank, batch, bucket): compiled program}, for the whole process.
_PROGRAMS: dict[tuple, dict[tuple, Any]] = {}


def _avals(leaves) -> tuple:
  return tuple((x.shape, str(x.dtype), x.sharding) for x in leaves)


def _static_rank(rank: Rank):
  """None, an int, or a profile {path: int} as a hashable sorted tuple of items (None: the
  enclosing rank scope's, if any)."""
  rank = effective_rank(rank)
  if isinstance(rank, Mapping):
    return tuple(sorted(rank.items()))
  if rank is None or is_static_rank(rank):
    return rank
  raise ValueError(f"generate takes rank None, an int or a profile of ints; got {rank!r}.")


def _left_pad(prompts: list[np.ndarray], bucket: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids (batch, bucket) with each prompt right-aligned, and starts (batch,): the number
  of padding slots before each. Rows past the prompts hold one token; nothing reads them."""
  tokens = np.zeros((batch, bucket), np.int32)
  starts = np.full((batch,), bucket - 1, np.int32)
  for b, prompt in enumerate(prompts):
    starts[b] = bucket - len(prompt)
    tokens[b, starts[b] :] = prompt
  return tokens, starts


class SamplingArrays(NamedTuple):
  """One Sampling per row as (B,) arrays: data, so new settings never recompile."""

  temperature: Any
  top_k: Any
  top_p: Any
  seed: Any

  @classmethod
  def of(cls, samplings: list[Sampling], batch: int) -> SamplingArrays:
    rows = samplings + [Sampling()] * (batch - len(samplings))  # padding rows: greedy
    fields = zip(*[(s.temperature, s.top_k, s.top_p, s.seed) for s in rows])
    return cls(*(np.asarray(v, d) for v, d in zip(fields, cls._dtypes())))

  @classmethod
  def shapes(cls, batch: int) -> SamplingArrays:
    return cls(*(jax.ShapeDtypeStruct((batch,), d) for d in cls._dtypes()))

  @staticmethod
  def _dtypes():
    return (np.float32, np.int32, np.float32, np.uint32)


@dataclasses.dataclass(frozen=True)
class _Request:
  """A generate() request, checked and normalised to one entry per prompt."""

  prompts: list[np.ndarray]
  max_new_tokens: list[int]
  samplings: list[Sampling]
  stops: list[tuple[str, ...]]
  batch_size: int

  @property
  def longest(self) -> int:
    return max(len(p) for p in self.prompts)

  @classmethod
  def check(cls, decoder, prompts, max_new_tokens, sampling, stop, tokenizer, batch_size):
    if len(prompts) == 0:
      raise ValueError("generate got no prompts.")
    n, vocab = len(prompts), decoder.model.config.vocab_size
    prompts = [np.asarray(p) for p in prompts]
    for i, p in enumerate(prompts):
      if p.ndim != 1 or p.size == 0 or not np.issubdtype(p.dtype, np.integer):
        raise ValueError(
          f"prompt {i} must be a non-empty sequence of token ids; got shape {p.shape}, "
          f"dtype {p.dtype}."
        )
      bad = p[(p < 0) | (p >= vocab)]
      if bad.size:
        raise ValueError(f"prompt {i} has token id {bad[0]} outside [0, vocab_size={vocab}).")
    max_new = [max_new_tokens] * n if _is_int(max_new_tokens) else list(max_new_tokens)
    samplings = [sampling] * n if isinstance(sampling, Sampling) else list(sampling)
    stops = _stops_per_row(stop, n)
    batch = n if batch_size is None else batch_size
    cls._check_sizes(decoder, prompts, max_new, samplings, batch)
    if any(stops) and tokenizer is None:
      raise ValueError(f"stop strings {stop!r} need a tokenizer to decode the text.")
    if any(not isinstance(s, str) or not s for row in stops for s in row):
      raise ValueError(f"stop strings must be non-empty strings; got {stop!r}.")
    return cls(prompts, max_new, samplings, stops, batch)

  @staticmethod
  def _check_sizes(decoder, prompts, max_new, samplings, batch) -> None:
    n = len(prompts)
    if len(max_new) != n or len(samplings) != n:
      raise ValueError(
        f"{n} prompts need one max_new_tokens and one Sampling each, or one for all; got "
        f"{len(max_new)} and {len(samplings)}."
      )
    if not all(_is_int(m) and m >= 1 for m in max_new):
      raise ValueError(f"max_new_tokens must be integers >= 1; got {max_new}.")
    if not _is_int(batch) or batch < n:
      raise ValueError(f"batch_size={batch!r} is smaller than the {n} prompts.")
    longest = max(len(p) for p in prompts)
    if longest > decoder.prompt_buckets[-1]:
      raise ValueError(
        f"a prompt of {longest} tokens is longer than the largest prompt bucket "
        f"{decoder.prompt_buckets[-1]}."
      )
    if longest + max(max_new) > decoder.slots:
      raise ValueError(
        f"longest prompt ({longest}) + largest max_new_tokens ({max(max_new)}) exceeds the "
        f"Decoder's {decoder.slots} slots (the rows of a batch share the cache)."
      )


def _stops_per_row(stop, n: int) -> list[tuple[str, ...]]:
  """`stop` as one tuple of strings per prompt: a string or a list of strings is every row's;
  a list of n lists (or tuples) gives each row its own."""
  if isinstance(stop, str):
    return [(stop,)] * n
  stop = list(stop)
  if stop and all(isinstance(s, (list, tuple)) for s in stop):
    if len(stop) != n:
      raise ValueError(f"{n} prompts need one list of stop strings each; got {len(stop)}.")
    return [tuple(s) for s in stop]
  return [tuple(stop)] * n


class _Row:
  """One prompt's progress on the host: its tokens so far and why it finished."""

  def __init__(self, max_new_tokens: int, eos_id, stop: tuple[str, ...], tokenizer):
    self.max_new_tokens = max_new_tokens
    self.eos_ids = set() if eos_id is None else {eos_id} if _is_int(eos_id) else set(eos_id)
    self.stop, self.tokenizer = stop, tokenizer
    self.tokens: list[int] = []
    self.text: str | None = None
    self.finish_reason: str | None = None

  def add(self, token: int) -> bool:
    """Takes the row's next token; True if it is part of the row's text (False for EOS, for the
    token that completes a stop string and for any token after the row finished)."""
    if self.finish_reason:
      return False
    if token in self.eos_ids:
      self.finish_reason = "eos"
      return False
    self.tokens.append(token)
    if self.stop:
      text = self.tokenizer.decode(self.tokens)
      found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
      if found:
        self.text, self.finish_reason = text[: min(found)], "stop"
        return False
    if len(self.tokens) >= self.max_new_tokens:
      self.finish_reason = "length"
    return True

  def completion(self) -> Completion:
    text = self.text
    if text is None and self.tokenizer is not None:
      text = self.tokenizer.decode(self.tokens)
    return Completion(self.tokens, text, self.finish_reason)


# ---- the compiled programs: graphdef, treedef, rank (and slots) are bound statically ----


def _merge(graphdef, treedef, leaves) -> LlamaModel:
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _rank_arg(static_rank):
  return dict(static_rank) if isinstance(static_rank, tuple) else static_rank


def _prefill(graphdef, treedef, static_rank, slots, leaves, tokens, starts, params):
  """tokens (B, P) left-padded by starts (B,) → the first new ids (B,), and a cache of `slots`
  positions holding the prompts from slot 0 of the longest one (index = its length)."""
  model = _merge(graphdef, treedef, leaves)
  b, p = tokens.shape
  cache = KVCache.init(model.config, b, p)
  logits, cache = model(tokens, rank=_rank_arg(static_rank), cache=cache, starts=starts)
  # Move the bucket's common padding out of the cache: decoding then has slots − (longest
  # prompt) free positions, whatever the bucket.
  shift = jnp.min(starts)

  def to_front(x):  # (B, P, kv, hd) → (B, slots, kv, hd)
    padded = jnp.pad(x, ((0, 0), (0, slots), (0, 0), (0, 0)))
    return jax.lax.dynamic_slice_in_dim(padded, shift, slots, axis=1)

  keys, values = tuple(map(to_front, cache.keys)), tuple(map(to_front, cache.values))
  token = sample(logits[:, -1], jnp.int32(0), params)
  return token, KVCache(keys, values, (p - shift).astype(jnp.int32))


def _step(graphdef, treedef, static_rank, leaves, token, cache, starts, step, params):
  """The previous ids (B,) written into the cache → the next ids (B,) and the cache."""
  model = _merge(graphdef, treedef, leaves)
  logits, cache = model(token[:, None], rank=_rank_arg(static_rank), cache=cache, starts=starts)
  return sample(logits[:, -1], step, params), cache


def sample(logits: jax.Array, step: jax.Array, params: SamplingArrays) -> jax.Array:
  """Next ids (B,) int32 from logits (B, V): per row, argmax at temperature 0, else a draw with
  key fold_in(key(seed), step) from softmax(logits / temperature) cut to the top_k most likely
  tokens and then to the smallest set whose probability reaches top_p."""
  vocab = logits.shape[-1]
  hot = params.temperature > 0
  scaled = logits / jnp.where(hot, params.temperature, 1.0)[:, None]
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # (B, V), most likely first
  k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
  in_top_k = jnp.arange(vocab) < k[:, None]
  probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
  # A token stays while the mass before it is short of top_p (the first always does).
  nucleus = (jnp.cumsum(probs, axis=-1) - probs < params.top_p[:, None]) | (
    params.top_p[:, None] >= 1
  )
  kept = jnp.sum(in_top_k & nucleus, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(ordered, kept - 1, axis=-1)  # the least likely token kept
  masked = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
  keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(params.seed)
  drawn = jax.vmap(jax.random.categorical)(keys, masked)
  return jnp.where(hot, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def generate(
  model: LlamaModel,
  prompt_tokens,
  max_new_tokens: int,
  rank: Rank = None,
  *,
  eos_id: int | None = None,
) -> list[int]:
  """Greedy decoding of one prompt: up to max_new_tokens ids continuing prompt_tokens (ids),
  ending with eos_id if it was generated.

  A thin wrapper over `Decoder` (batches, sampling, stop strings, programs
  compiled ahead of time), sized to this one request: each prompt length and max_new_tokens
  compiles its own programs, as each rank (None, an int or a profile {path: int}) does.
  """
  prompt = list(prompt_tokens)
  decoder = Decoder(
    model, slots=len(prompt) + max_new_tokens, prompt_buckets=(max(len(prompt), 1),)
  )
  done = decoder.generate([prompt], max_new_tokens, rank, eos_id=eos_id)[0]
  return done.tokens + ([eos_id] if done.finish_reason == "eos" else [])
