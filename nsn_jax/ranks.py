"""Which ranks each training step evaluates.

Ranks are data: every step hands the jitted train step an int32 vector of k ranks, so one
compiled program serves every draw. Draws come from an RNG keyed by (seed, step), so a resumed
run replays exactly the ranks of the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import ml_collections
import numpy as np


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


def _check_ranks(ranks: Sequence[int], max_rank: int, name: str) -> None:
  bad = [r for r in ranks if not isinstance(r, (int, np.integer)) or not 1 <= r <= max_rank]
  if bad:
    raise ValueError(f"{name} {tuple(ranks)} has ranks outside 1..{max_rank}: {bad}.")


def held_out_ranks(source: RankSource) -> tuple[int, ...]:
  """Ranks in 1..R that training never evaluates (reported as "OOD" by the sweep)."""
  trained = set(source.trained_ranks())
  return tuple(r for r in range(1, source.max_rank + 1) if r not in trained)


def rank_source_from_config(
  config: ml_collections.ConfigDict, max_rank: int, total_steps: int, seed: int
) -> RankSource:
  """Builds the source `config.ranks` names: kind = 'fixed' or 'anchor_variants'."""
  kind = config.kind
  if kind == "fixed":
    return FixedRanks(tuple(int(r) for r in config.fixed), max_rank)
  if kind == "anchor_variants":
    return AnchorAndVariants(
      max_rank=max_rank,
      min_rank=config.min_rank,
      num_variants=config.num_variants,
      curriculum=config.curriculum,
      warmup_fraction=config.warmup_fraction,
      total_steps=total_steps,
      num_stages=config.num_stages,
      held_out=tuple(int(r) for r in config.held_out),
      seed=seed,
    )
  raise ValueError(f"ranks.kind must be 'fixed' or 'anchor_variants', got {kind!r}.")
