"""The server's settings, in one typed record checked in one place before anything loads."""

from __future__ import annotations

import dataclasses
import math

from nsn_jax.cli import DEFAULT_CACHE
from nsn_jax.config import ConfigError
from nsn_jax.sweep import parse_ranks

POLICIES = ("fixed", "slo")


@dataclasses.dataclass(frozen=True)
class ServeOptions:
  """How to serve a checkpoint. Times in ms; rows count examples (a generation is one row)."""

  path: str  # a train.py workdir, a checkpoint directory or an export
  host: str = "127.0.0.1"
  port: int = 8000
  policy: str = "fixed"  # fixed: every open batch at `rank`; slo: the largest rank within slo_ms
  rank: int | None = None  # the fixed policy's rank (default R)
  profiles: bool = False  # serve the checkpoint's FlexRank profiles instead of a rank ladder
  ranks: str = ""  # the rank ladder compiled and served, eval.py's syntax ("" = powers of 2 and R)
  # What a request's budget is a fraction of: by default the rank-R model's FLOPs, or with
  # profiles the dense model's (the unit FlexRank's own budgets are in).
  budget_reference: str | None = None
  max_batch: int = 32
  batch_sizes: tuple[int, ...] = ()  # compiled batch sizes ( = 1, 4, 16, … and max_batch)
  max_wait_ms: float = 5.0
  max_queue: int = 1024
  slo_ms: float | None = None
  slo_percentile: float = 99.0
  compilation_cache: str = DEFAULT_CACHE  # "" turns JAX's persistent cache off
  context: int = 512  # generation: KV-cache slots (prompt + new tokens)
  max_new_tokens: int = 256  # generation: the most a request may ask for
  drain_timeout_s: float = 30.0
  step: int | None = None  # a checkpoint step (default: the newest good one)

  def validate(self) -> ServeOptions:
    """Raises ConfigError naming the flag, its value and what is valid; returns self."""
    _check("--policy", self.policy, self.policy in POLICIES, " | ".join(POLICIES))
    _check("--port", self.port, 0 <= self.port < 65536, "0..65535 (0: any free port)")
    _check("--max_batch", self.max_batch, self.max_batch >= 1, "an integer ≥ 1")
    sizes = self.batch_sizes
    _check(
      "--batch_sizes",
      ",".join(map(str, sizes)),
      all(s >= 1 for s in sizes) and (not sizes or max(sizes) == self.max_batch),
      f"sizes ≥ 1 whose largest is --max_batch={self.max_batch}",
    )
    _check("--max_wait_ms", self.max_wait_ms, 0 <= self.max_wait_ms < math.inf, "≥ 0")
    _check("--max_queue", self.max_queue, self.max_queue >= self.max_batch, "≥ --max_batch")
    _check("--slo_percentile", self.slo_percentile, 0 < self.slo_percentile <= 100, "(0, 100]")
    if self.policy == "slo" or self.slo_ms is not None:
      _check("--slo_ms", self.slo_ms, (self.slo_ms or 0) > 0, "a latency target > 0 in ms")
    _check(
      "--budget_reference",
      self.budget_reference,
      self.budget_reference in (None, "max_rank", "dense"),
      "max_rank | dense",
    )
    _check("--context", self.context, self.context >= 2, "an integer ≥ 2")
    _check(
      "--max_new_tokens",
      self.max_new_tokens,
      1 <= self.max_new_tokens < self.context,
      f"1..{self.context - 1} (below --context)",
    )
    _check("--drain_timeout_s", self.drain_timeout_s, self.drain_timeout_s >= 0, "≥ 0")
    if self.rank is not None:
      _check("--rank", self.rank, self.rank >= 1, "an integer ≥ 1")
    if self.ranks:
      parse_ranks(self.ranks, max_rank=None)  # the syntax; the range once R is known
    if self.profiles and (self.ranks or self.rank is not None):
      raise ConfigError(
        "--profiles", True, "alone: a profile server has no rank ladder", "--ranks/--rank given"
      )
    return self

  def reference(self) -> str:
    """The budget reference in force: the flag, else "dense" for profiles, else "max_rank"."""
    return self.budget_reference or ("dense" if self.profiles else "max_rank")

  def compiled_batch_sizes(self) -> tuple[int, ...]:
    """`batch_sizes`, or powers of 4 below max_batch and max_batch itself."""
    if self.batch_sizes:
      return tuple(sorted(set(self.batch_sizes)))
    return tuple(sorted({*(4**i for i in range(8) if 4**i < self.max_batch), self.max_batch}))

  def ladder(self, max_rank: int | None) -> tuple[int, ...]:
    """The served ranks for a model of rank R (`max_rank`; None: no ranks), `rank` included.
    Raises ConfigError for ranks outside 1..R, or a rank on a model without ranks."""
    if max_rank is None:
      if self.ranks or self.rank is not None:
        raise ConfigError(
          "--ranks/--rank",
          self.ranks or self.rank,
          "unset",
          "this model has no ranks (a dense model or an export)",
        )
      return ()
    if self.ranks:
      ranks = set(parse_ranks(self.ranks, max_rank))
    else:
      ranks = {2**i for i in range(max_rank.bit_length())} | {max_rank}
    if self.rank is not None:
      _check("--rank", self.rank, self.rank <= max_rank, f"1..{max_rank} (this model's ranks)")
      ranks.add(self.rank)
    return tuple(sorted(ranks))


def _check(flag: str, value, ok: bool, valid: str) -> None:
  if not ok:
    raise ConfigError(flag, value, valid)
