"""Bootstrap intervals over test examples (and seeds) for the studies' per-example scores.

Scores come as `RankEvaluator(per_row=True)` returns them: {loss, correct, weight: (N,)} sums
per example, so a metric over a resample is a ratio of sums (tokens weigh by their count).
Every model is resampled with the same draws, so differences are paired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Rows = Mapping[str, np.ndarray]  # {"loss", "correct", "weight"}: (N,) per-example sums
LEVEL = 0.95


def draws(n: int, count: int = 2000, seed: int = 0) -> np.ndarray:
  """(count, n) example indices drawn with replacement: one bootstrap resample per row."""
  return np.random.default_rng(seed).integers(0, n, size=(count, n))


def metric(rows: Rows, name: str, idx: np.ndarray | slice = slice(None)) -> np.ndarray | float:
  """accuracy (correct / weight) or loss (nats per scored token or example) over the examples
  `idx`: (count, n) resamples → (count,); a slice → the plain value."""
  numerator = rows["correct" if name == "accuracy" else "loss"]
  return np.sum(numerator[idx], axis=-1) / np.sum(rows["weight"][idx], axis=-1)


def interval(samples: np.ndarray) -> tuple[float, float]:
  """The central LEVEL percentile interval of bootstrap samples."""
  tail = 100 * (1 - LEVEL) / 2
  lo, hi = np.percentile(samples, [tail, 100 - tail])
  return float(lo), float(hi)


def error_bars(values, cis, scale: float = 1.0) -> np.ndarray:
  """matplotlib's asymmetric `yerr` (2, n) for point values and their (lo, hi) intervals, all
  multiplied by `scale` (100: fractions as points)."""
  values, cis = np.asarray(values, np.float64), np.asarray(cis, np.float64)
  return scale * np.stack([values - cis[:, 0], cis[:, 1] - values])


def paired(a: Rows, b: Rows, name: str, idx: np.ndarray) -> dict:
  """metric(a) − metric(b) with its bootstrap interval, and each side's own value and interval."""
  sa, sb = metric(a, name, idx), metric(b, name, idx)
  return {
    "a": float(metric(a, name)),
    "a_ci": interval(sa),
    "b": float(metric(b, name)),
    "b_ci": interval(sb),
    "diff": float(metric(a, name) - metric(b, name)),
    "diff_ci": interval(sa - sb),
  }


def seed_mean_gap(
  pairs: Sequence[tuple[Rows, Rows]], name: str, idx: np.ndarray, seed: int = 0
) -> dict:
  """Mean over seeds of metric(a) − metric(b), one (a, b) pair per seed on the same examples.

  The interval resamples seeds (with replacement, one seed draw per example draw) and examples
  (the same draw for every seed): it holds both training noise and test sampling noise."""
  gaps = np.stack([metric(a, name, idx) - metric(b, name, idx) for a, b in pairs])  # (S, count)
  picks = np.random.default_rng(seed + 1).integers(0, len(pairs), size=(idx.shape[0], len(pairs)))
  resampled = np.take_along_axis(gaps.T, picks, axis=1).mean(axis=1)
  point = float(np.mean([metric(a, name) - metric(b, name) for a, b in pairs]))
  return {"diff": point, "diff_ci": interval(resampled), "seeds": len(pairs)}


def verdict(gap_ci: tuple[float, float], paper: float) -> str:
  """How a measured gap (dense − nested, in points, as a CI) stands against the paper's:
  'beaten' (the whole interval is below it), 'not matched' (above it) or 'not resolved'."""
  lo, hi = gap_ci
  if hi < paper:
    return f"beaten: the gap's interval [{lo:.1f}, {hi:.1f}] lies below the paper's {paper:g}"
  if lo > paper:
    return f"not matched: the gap's interval [{lo:.1f}, {hi:.1f}] lies above the paper's {paper:g}"
  return f"not resolved: the gap's interval [{lo:.1f}, {hi:.1f}] contains the paper's {paper:g}"
