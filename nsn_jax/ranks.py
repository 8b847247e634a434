"""Which ranks each training step evaluates.

Ranks are data: every step hands the jitted train step an int32 vector of k ranks, so one
compiled program serves every draw. Draws come from an RNG keyed by (seed, step), so a resumed
run replays exactly the ranks of the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import ml_collections
import numpy as np

from nsn_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class FixedRanks:
  """The same k ranks every step (the design card's vmapped rank set, e.g. R, R/2, R/4, R/8)."""

  ranks: tuple[int, ...]
  max_rank: int

  def __post_init__(self):
    _check_ranks(self.ranks, self.max_rank, "ranks")
    if len(set(self.ranks)) != len(self.ranks):
      raise ValueError(f"ranks must be distinct, got {self.ranks}.")

  def __call__(self, step: int) -> np.ndarray:
    """int32 (k,) ranks for `step`."""
    del step
    return np.asarray(self.ranks, np.int32)

  def trained_ranks(self) -> tuple[int, ...]:
    return tuple(sorted(self.ranks))


@dataclasses.dataclass(frozen=True)
class AnchorAndVariants:
  """The paper's setting: the anchor rank R plus `num_variants` ranks drawn each step.

  A curriculum widens the draw range downward from R to `min_rank` over the first
  `warmup_fraction` of `total_steps`:
    linear: the lower bound moves down one rank at a time, evenly over the warm-up;
    step:   the lower bound moves down in `num_stages` equal jumps;
    none:   the full range [min_rank, R] from the first step.
  Variants are drawn uniformly from the current range less `held_out` (never drawn) and less R
  (already the anchor) unless nothing else is left.
  """

  max_rank: int
  min_rank: int = 1
  num_variants: int = 1
  curriculum: str = "linear"
  warmup_fraction: float = 0.3
  total_steps: int = 1
  num_stages: int = 4
  held_out: tuple[int, ...] = ()
  seed: int = 0

  def __post_init__(self):
    if self.curriculum not in ("linear", "step", "none"):
      raise ValueError(f"curriculum must be 'linear', 'step' or 'none', got {self.curriculum!r}.")
    _check_ranks((self.min_rank,), self.max_rank, "min_rank")
    _check_ranks(self.held_out, self.max_rank, "held_out")
    if self.max_rank in self.held_out:
      raise ValueError(f"the anchor rank R={self.max_rank} cannot be held out.")
    if not self.trained_ranks()[:-1] and self.min_rank < self.max_rank:
      raise ValueError("held_out leaves no rank below R to train.")
    if self.num_variants < 1 or not 0.0 <= self.warmup_fraction <= 1.0:
      raise ValueError("num_variants must be ≥ 1 and warmup_fraction in [0, 1].")

  def lower_bound(self, step: int) -> int:
    """The smallest rank that may be drawn at `step`."""
    span = self.max_rank - self.min_rank
    warmup_steps = self.warmup_fraction * self.total_steps
    progress = (
      1.0 if self.curriculum == "none" or warmup_steps == 0 else min(1.0, step / warmup_steps)
    )
    if self.curriculum == "step":
      progress = np.floor(progress * self.num_stages) / self.num_stages
    return self.max_rank - int(np.floor(progress * span))

  def candidates(self, step: int) -> np.ndarray:
    """The ranks a variant may take at `step`."""
    lo = self.lower_bound(step)
    allowed = [r for r in range(lo, self.max_rank) if r not in self.held_out]
    return np.asarray(allowed or [self.max_rank], np.int32)

  def __call__(self, step: int) -> np.ndarray:
    """int32 (1 + num_variants,) ranks for `step`: [R, variant, ...]."""
    rng = np.random.default_rng([self.seed, step])
    variants = rng.choice(self.candidates(step), size=self.num_variants)
    return np.concatenate([[self.max_rank], variants]).astype(np.int32)

  def trained_ranks(self) -> tuple[int, ...]:
    return tuple(r for r in range(self.min_rank, self.max_rank + 1) if r not in self.held_out)


RankSource = FixedRanks | AnchorAndVariants


@dataclasses.dataclass(frozen=True)
class BucketPrice:
  """What the automatic plan weighs: the price of one more bucket in rank-width units
  (|b| · max b), one more program step against the FLOPs it saves, and the most buckets."""

  overhead: float
  max_buckets: int | None  # None: no limit


# Per JAX platform. On CPU one rank per bucket was the fastest plan measured (docs/benchmarks.md,
# "Multi-rank train step vs PyTorch"). Elsewhere the price chosen on CPU before the shared first
# layers and the vmapped matmul's weight gradient, not yet measured on a GPU or TPU.
BUCKET_PRICES = {"cpu": BucketPrice(overhead=0.0, max_buckets=None)}
DEFAULT_BUCKET_PRICE = BucketPrice(overhead=8.0, max_buckets=6)


def bucket_price(platform: str) -> BucketPrice:
  """The automatic plan's price on `platform` ("cpu", "gpu", "tpu")."""
  return BUCKET_PRICES.get(platform, DEFAULT_BUCKET_PRICE)


@dataclasses.dataclass(frozen=True)
class BucketPlan:
  """How a fixed rank set runs as buckets of similar ranks (`train.multi_rank`).

  ranks: the set in step order (the order of the per-rank metrics). buckets: the ranks grouped,
  each bucket in descending order; a bucket runs at the static width of its largest rank,
  vmapped over its ranks as prefix masks within that width (`layers.WidthRank`), a one-rank
  bucket too. Cost in rank-width units: Σ_b |b| · max(b), against Σ r for one pass per rank and
  k · R for the masked vmap over the full width.
  """

  ranks: tuple[int, ...]
  buckets: tuple[tuple[int, ...], ...]

  def __post_init__(self):
    grouped = [r for bucket in self.buckets for r in bucket]
    if sorted(grouped) != sorted(self.ranks) or len(set(self.ranks)) != len(self.ranks):
      raise ValueError(f"buckets {self.buckets} do not group the distinct ranks {self.ranks}.")
    if any(list(bucket) != sorted(bucket, reverse=True) for bucket in self.buckets):
      raise ValueError(f"each bucket must list its ranks in descending order: {self.buckets}.")

  @classmethod
  def singletons(cls, ranks: Sequence[int]) -> BucketPlan:
    """One rank per bucket: one pass per rank at its own width (`loop_static`)."""
    ranks = tuple(int(r) for r in ranks)
    return cls(ranks, tuple((r,) for r in ranks))

  @classmethod
  def auto(cls, ranks: Sequence[int], price: BucketPrice = DEFAULT_BUCKET_PRICE) -> BucketPlan:
    """The plan of at most `price.max_buckets` runs of the sorted ranks minimising
    Σ_b (|b| · max(b) + price.overhead); a pure function of its arguments (ties: fewer
    buckets)."""
    ranks = tuple(int(r) for r in ranks)
    if not ranks:
      raise ValueError("a bucket plan needs at least one rank.")
    desc = sorted(ranks, reverse=True)
    k = len(desc)
    limit = k if price.max_buckets is None else min(price.max_buckets, k)
    # best[m][j]: (cost, start of the last bucket) of the first j sorted ranks in m buckets.
    best = [[(math.inf, 0)] * (k + 1) for _ in range(limit + 1)]
    best[0][0] = (0.0, 0)
    for m in range(1, limit + 1):
      for j in range(1, k + 1):
        best[m][j] = min(
          (best[m - 1][i][0] + (j - i) * desc[i] + price.overhead, i) for i in range(j)
        )
    count = min(range(1, limit + 1), key=lambda m: (best[m][k][0], m))
    cuts, j = [], k
    for m in range(count, 0, -1):
      i = best[m][j][1]
      cuts.append(tuple(desc[i:j]))
      j = i
    return cls(ranks, tuple(reversed(cuts)))

  def width_units(self) -> int:
    """Σ_b |b| · max(b): the bucketed step's NSN-layer work, in units of one rank's pass."""
    return sum(len(bucket) * bucket[0] for bucket in self.buckets)

  def order(self) -> tuple[int, ...]:
    """For each rank of `ranks`, its row in the buckets' outputs stacked in bucket order."""
    row = {r: i for i, r in enumerate(r for bucket in self.buckets for r in bucket)}
    return tuple(row[r] for r in self.ranks)

  def __str__(self) -> str:
    """The buckets, e.g. "[64] [32] [16] [8,7,6,5] [4,3,2,1]"."""
    return " ".join(f"[{','.join(map(str, bucket))}]" for bucket in self.buckets)

  def describe(self, max_rank: int) -> str:
    """One line: the buckets and their work against Σ r, beside the masked vmap's k · R."""
    total = sum(self.ranks)
    return (
      f"multi-rank buckets: {self} — {self.width_units() / total:.2f}× Σr rank-width units "
      f"vs {len(self.ranks) * max_rank / total:.2f}× for vmap_masked"
    )


def _check_ranks(ranks: Sequence[int], max_rank: int, name: str) -> None:
  bad = [r for r in ranks if not isinstance(r, (int, np.integer)) or not 1 <= r <= max_rank]
  if bad:
    raise ValueError(f"{name} {tuple(ranks)} has ranks outside 1..{max_rank}: {bad}.")


def held_out_ranks(source: RankSource) -> tuple[int, ...]:
  """Ranks in 1..R that training never evaluates (reported as "OOD" by the sweep)."""
  trained = set(source.trained_ranks())
  return tuple(r for r in range(1, source.max_rank + 1) if r not in trained)


def rank_source_from_config(config: ml_collections.ConfigDict) -> RankSource:
  """The source a validated config's `ranks` section names (kind fixed or anchor_variants)."""
  ranks, max_rank = config.ranks, config.model.max_rank
  if ranks.kind == "fixed":
    return FixedRanks(config_lib.fixed_ranks(config), max_rank)
  return AnchorAndVariants(
    max_rank=max_rank,
    min_rank=ranks.min_rank,
    num_variants=ranks.num_variants,
    curriculum=ranks.curriculum,
    warmup_fraction=ranks.warmup_fraction,
    total_steps=config.train.steps,
    num_stages=ranks.num_stages,
    held_out=tuple(int(r) for r in ranks.held_out),
    seed=config.seed,
  )
