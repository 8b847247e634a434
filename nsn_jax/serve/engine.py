"""The device side of the server: one restored model, its compiled programs, requests → results.

An engine holds every (rank, batch size) program compiled ahead of traffic, checks a request's
JSON into model inputs (`parse`, raising `RequestError` with the HTTP status and one line), and
runs a batch of parsed requests at a rank (`run`, on the server's single device thread). One
kind per model kind the library trains: `classify.Classifier` (image or text classification)
and `generate.Generator` (a language model: prompt → text with the KV cache).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

from flax import nnx
import jax

from nsn_jax import flops
from nsn_jax.deploy import deploy
from nsn_jax.layers import nsn_layers
from nsn_jax.llm.decode import compile_now
from nsn_jax.profiles import summarise
from nsn_jax.restore import Restored
from nsn_jax.serve.executables import ExecutableStore

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


def field(body: dict, name: str, kind, check: Callable[[Any], bool], valid: str, default=None):
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
    rows_per_unit: int = 1,
    store: ExecutableStore | None = None,
  ):
    self.model, self.config, self.step = restored.model, restored.config, restored.step
    self.seq_len, self.budget_reference = seq_len, budget_reference
    # FLOPs are reported per unit (an example of a text classifier is seq_len rows), computed
    # once per point: walking the model for them costs more than parsing a request.
    self.rows_per_unit, self._flops = rows_per_unit, {}
    self.dense_flops = rows_per_unit * flops.dense_model_flops(self.model, seq_len)
    self.nested = bool(nsn_layers(self.model))
    self.max_rank = flops.max_rank(self.model) if self.nested else None
    # What a batch can run at ("points"), cheapest first: ints, FlexRank profiles (hashable
    # {layer path: rank} mappings, one budget each) or None for a model without ranks.
    self.profile_budget = {ranks: budget for budget, ranks in (profiles or {}).items()}
    points = (list(self.profile_budget) or list(ranks)) if self.nested else [None]
    self.ranks = tuple(sorted(points, key=self.flops))
    self.batch_sizes = tuple(sorted(batch_sizes))
    self._programs: dict[tuple, Any] = {}
    # Programs come from `store` (kept on disk between restarts, executables.py) when given.
    self.store = store
    self.compiler = compile_now if store is None else store.compile

  def fixed_model(self, point) -> nnx.Module:
    """The model fixed at `point`, factors cut to its ranks and stored contiguously
    (`deploy`, factorised form: the same products as `model(x, rank=point)`). Slicing the full
    factors inside each program copies a strided (d_in, r) block every call: on a 2-core CPU an
    8192-wide layer at r = 384 ran 1.7× slower that way. Costs the ladder's factors in memory."""
    return self.model if point is None else deploy(self.model, point, form="factorised")[0]

  def label(self, point) -> str:
    """A point's name in metrics and logs: the rank, or "profile@<budget>"."""
    return f"profile@{self.profile_budget[point]!r}" if isinstance(point, Mapping) else str(point)

  def describe_point(self, point) -> dict:
    """A point in JSON: its rank (None for a profile or a model without ranks), the profile's
    budget and per-layer rank range, and its FLOPs."""
    record = {"rank": None if isinstance(point, Mapping) else point}
    if isinstance(point, Mapping):
      record["profile"] = {"budget": self.profile_budget[point], "ranks": summarise(point)}
    return {**record, "flops": self.flops(point), "flops_frac_dense": self.flops_frac_dense(point)}

  def flops(self, point) -> int:
    """FLOPs of the unit a response reports (an example, or a generated token) at `point`."""
    if point not in self._flops:
      self._flops[point] = self.rows_per_unit * flops.model_flops(self.model, point, self.seq_len)
    return self._flops[point]

  def flops_frac_dense(self, point) -> float:
    return self.flops(point) / self.dense_flops

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
    reference = self.flops(None) if self.budget_reference == "max_rank" else self.dense_flops
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
    rank = field(body, "rank", int, lambda r: True, "an integer served rank")
    budget = field(
      body, "budget", (int, float), lambda b: 0 < b <= 1, "a fraction of FLOPs in (0, 1]"
    )
    return rank, None if budget is None else float(budget)

  def _program(self, key: tuple, name: str, lower: Callable[[], jax.stages.Lowered]):
    if key not in self._programs:
      self._programs[key] = self.compiler(name, lower)
    return self._programs[key]
