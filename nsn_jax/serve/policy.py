"""Which rank a batch runs at: a fixed rank, or the largest rank that keeps the latency SLO.

Latency is modelled per (rank, batch size) as seconds per *unit* of work (one forward pass of a
classifier; one prefill or decode step of a generator), so one table serves both model kinds.
Start-up measures every compiled program; every served batch then updates its entry online.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
import math

import numpy as np

# A rank must serve 25% more rows per second than arrive: arrivals are bursty (Poisson) and the
# server's own HTTP work takes CPU from the device on a host-bound machine.
HEADROOM = 1.25


class LatencyModel:
  """Recent seconds-per-unit samples for each (rank, batch size), and a percentile of them.

  A sliding window (not a running mean) so that a machine that slows down under load, or a
  cache that warms up, moves the estimate within `window` batches.
  """

  def __init__(self, percentile: float, window: int = 64):
    self.percentile, self.window = percentile, window
    self._samples: dict[tuple[int, int], collections.deque] = {}

  def observe(self, rank: int, batch_size: int, seconds_per_unit: float) -> None:
    key = (rank, batch_size)
    if key not in self._samples:
      self._samples[key] = collections.deque(maxlen=self.window)
    self._samples[key].append(seconds_per_unit)

  def seconds(self, rank: int, batch_size: int, units: float = 1.0) -> float:
    """The `percentile` of the seconds one batch of `units` units takes; inf when never
    measured (so an unmeasured rank is never chosen for an SLO)."""
    samples = list(self._samples.get((rank, batch_size), ()))  # a copy: the device thread adds
    if not samples:
      return math.inf
    return units * float(np.percentile(samples, self.percentile))

  def to_json(self, label=str) -> dict[str, list[float]]:
    """{"<label(rank)>/<batch>": recent seconds per unit}: what a restart seeds itself from."""
    return {f"{label(r)}/{b}": list(samples) for (r, b), samples in list(self._samples.items())}

  def seed(self, saved: dict[str, list[float]], points: dict[str, object]) -> None:
    """Adopts `to_json`'s samples for the points still served (`points`: label → point)."""
    for key, samples in saved.items():
      name, batch = key.rsplit("/", 1)
      if name in points:
        for seconds in samples[-self.window :]:
          self.observe(points[name], int(batch), float(seconds))

  def has(self, rank, batch_size: int) -> bool:
    return bool(self._samples.get((rank, batch_size)))

  def table(self, label=str) -> dict[str, float]:
    """{"<label(rank)>/<batch>": ms per unit} at the percentile: what /v1/model reports."""
    return {f"{label(r)}/{b}": 1e3 * self.seconds(r, b) for r, b in list(self._samples)}


@dataclasses.dataclass(frozen=True)
class Backlog:
  """What the scheduler knows when it picks a rank (a batch about to run) or admits a request
  (no batch: batch_rows 0). Times in seconds; ages since arrival."""

  batch_rows: int  # rows in the batch about to run (0 when admitting)
  batch_units: float  # its units of work (e.g. 1 + the most new tokens a row asks for)
  batch_age: float  # how long its oldest request has waited
  queued_rows: int  # rows waiting behind it (when admitting: the queue, the new one included)
  queued_units: float  # units per batch of the requests behind it (their largest)
  queued_age: float  # how long the oldest of them has waited (0 when none)
  busy_s: float = 0.0  # until the device finishes the batch it is running now
  arrival_rows_per_s: float = 0.0  # the offered load, refused requests included


class FixedPolicy:
  """Every batch at one rank: the max-rank baseline, or a chosen operating point."""

  name = "fixed"

  def __init__(self, rank: int):
    self.rank = rank

  def choose(self, backlog: Backlog) -> int:
    del backlog
    return self.rank

  def overloaded(self, backlog: Backlog) -> float | None:
    """Seconds a client should wait before retrying, or None to admit. A fixed rank never
    sheds load by prediction: only the bounded queue refuses requests."""
    del backlog
    return None


class SloPolicy:
  """The most expensive rank whose predicted completion keeps every queued request within the SLO.

  For each rank, largest first, it predicts at the latency model's percentile (so p99 targets
  the 99th percentile of recent batches): the batch about to run finishes at its age plus its
  own latency, and the requests behind it finish after ceil(queued / max_batch) more batches.
  The first rank for which both fit, and whose full batches keep up with the offered load (so
  the queue does not grow behind it), is chosen; when none does, the smallest rank (fastest).
  """

  name = "slo"

  def __init__(
    self,
    ranks: Sequence[int],
    latency: LatencyModel,
    slo_s: float,
    max_batch: int,
    bucket_of,
  ):
    self.ranks = list(reversed(ranks))  # given cheapest first; tried most expensive first
    self.latency, self.slo_s, self.max_batch = latency, slo_s, max_batch
    self.bucket_of = bucket_of  # rows -> the compiled batch size they run at

  def _finish_times(self, rank: int, b: Backlog) -> tuple[float, float]:
    """When the batch's oldest request and the oldest request behind it would complete, in
    seconds from their arrival (0 for an absent one)."""
    own = (
      self.latency.seconds(rank, self.bucket_of(b.batch_rows), b.batch_units)
      if b.batch_rows
      else 0.0
    )
    batches = math.ceil(b.queued_rows / self.max_batch)
    rows = min(b.queued_rows, self.max_batch)
    behind = (
      batches * self.latency.seconds(rank, self.bucket_of(rows), b.queued_units) if batches else 0.0
    )
    first = b.batch_age + b.busy_s + own if b.batch_rows else 0.0
    last = b.queued_age + b.busy_s + own + behind if batches else 0.0
    return first, last

  def sustains(self, rank, backlog: Backlog) -> bool:
    """Whether full batches at `rank` serve rows faster than they are offered, with HEADROOM: a
    rank that does not lets the queue grow, and the batches that follow miss the SLO."""
    units = backlog.queued_units or backlog.batch_units or 1.0
    seconds = self.latency.seconds(rank, self.bucket_of(self.max_batch), units)
    return self.max_batch / seconds >= HEADROOM * backlog.arrival_rows_per_s

  def choose(self, backlog: Backlog) -> int:
    for rank in self.ranks:
      fits = max(self._finish_times(rank, backlog)) <= self.slo_s
      if fits and self.sustains(rank, backlog):
        return rank
    return self.ranks[-1]

  def overloaded(self, backlog: Backlog) -> float | None:
    """Seconds to wait before retrying when even the smallest rank would finish the queued
    requests (the new one among them) after the SLO; None to admit."""
    late = max(self._finish_times(self.ranks[-1], backlog)) - self.slo_s
    return late if late > 0 else None
