"""Dynamic batching: requests wait in one bounded queue and run in batches on one device thread.

A batch is the oldest waiting request plus the requests behind it that ask for the same rank
(or, like it, leave the rank to the policy), up to `max_batch` rows; it waits at most `max_wait_s`
from its oldest request's arrival for more to come. The policy then picks the rank of a batch
that left it open. Batches run one at a time on a single worker thread (one accelerator; the
event loop stays free to accept, refuse and report), and each run updates the latency model.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
import dataclasses
import math
import time
from typing import Any

from nsn_jax.serve.engine import Engine, Parsed
from nsn_jax.serve.policy import Backlog, LatencyModel

ARRIVAL_WINDOW_S = 1.0  # the offered load is measured over this trailing window


class Overloaded(Exception):
  """The request is refused now (HTTP 503); retry after `retry_after_s` seconds."""

  def __init__(self, reason: str, retry_after_s: float):
    super().__init__(reason)
    self.retry_after_s = retry_after_s


@dataclasses.dataclass
class Pending:
  """A parsed request waiting for its batch; `done` resolves to (result, BatchInfo)."""

  request: Parsed
  arrival: float
  done: asyncio.Future


@dataclasses.dataclass(frozen=True)
class BatchInfo:
  """How a request was served: the rank, the compiled batch size it ran in, who chose the rank
  ("request" or the policy's name), and its time in the queue and on the device (s)."""

  rank: int | None
  batch_size: int
  rows: int
  chosen_by: str
  queue_s: float
  compute_s: float


class Batcher:
  """The queue, the batching loop and admission control of one engine."""

  def __init__(
    self,
    engine: Engine,
    policy,
    latency: LatencyModel,
    max_batch: int,
    max_wait_s: float,
    max_queue: int,
    on_batch=lambda info, rows: None,
  ):
    self.engine, self.policy, self.latency = engine, policy, latency
    self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
    self.on_batch = on_batch  # metrics hook: (BatchInfo, rows in the batch)
    self.queue: collections.deque[Pending] = collections.deque()
    self.queued_rows = 0
    self._arrived = asyncio.Event()
    self._device = ThreadPoolExecutor(1, thread_name_prefix="device")
    self._running: tuple[float, float] | None = None  # (start, predicted seconds) of the batch
    self.arrivals: collections.deque[tuple[float, int]] = collections.deque()  # (time, rows)
    self._stopping = False

  # --- admission -------------------------------------------------------------------------
  def full(self, rows: int = 1) -> Overloaded | None:
    """The refusal for `rows` more rows when the queue cannot take them (checked before a body
    is even read), else None."""
    if self.queued_rows + rows <= self.max_queue:
      return None
    waiting = f"queue full ({self.queued_rows} of {self.max_queue} rows waiting)"
    return Overloaded(waiting, self._drain_s())

  def submit(self, request: Parsed, arrival: float) -> asyncio.Future:
    """Queues `request`, which reached the server at `arrival` (time.monotonic()); its future
    resolves to (result, BatchInfo). Raises Overloaded when the queue is full or the policy
    predicts even its fastest rank would miss the SLO."""
    self.arrivals.append((arrival, request.rows))  # offered load: refused requests count too
    self._forget_arrivals(arrival)
    refusal = self.full(request.rows)
    if refusal is not None:
      raise refusal
    # An idle server always admits: its latency estimates may be stale (a slow spell), and
    # only a batch that runs refreshes them.
    idle = not self.queue and self._running is None
    late = None if idle else self.policy.overloaded(self._backlog(0, 0.0, 0.0, request))
    if late is not None:
      raise Overloaded("even the smallest rank cannot serve the queue within the SLO", late)
    pending = Pending(request, arrival, asyncio.get_running_loop().create_future())
    self.queue.append(pending)
    self.queued_rows += request.rows
    self._arrived.set()
    return pending.done

  def _backlog(
    self, rows: int, units: float, age: float, admitting: Parsed | None = None
  ) -> Backlog:
    """What the policy sees now: a batch of `rows` about to run (0 when admitting), the queue
    behind it (with the request being admitted), the device's remaining busy time and the
    offered load."""
    now = time.monotonic()
    queued = [p.request for p in self.queue] + ([admitting] if admitting else [])
    busy = 0.0
    if self._running is not None:
      start, predicted = self._running
      busy = max(0.0, predicted - (now - start))
    return Backlog(
      batch_rows=rows,
      batch_units=units,
      batch_age=age,
      queued_rows=sum(r.rows for r in queued),
      queued_units=max((r.units for r in queued), default=0.0),
      queued_age=now - self.queue[0].arrival if self.queue else 0.0,
      busy_s=busy,
      arrival_rows_per_s=self._arrival_rate(now),
    )

  def _forget_arrivals(self, now: float) -> None:
    """Drops arrivals older than ARRIVAL_WINDOW_S (on every submit: the window stays small)."""
    while self.arrivals and self.arrivals[0][0] < now - ARRIVAL_WINDOW_S:
      self.arrivals.popleft()

  def _arrival_rate(self, now: float) -> float:
    """Rows offered per second over the last ARRIVAL_WINDOW_S."""
    self._forget_arrivals(now)
    return sum(rows for _, rows in self.arrivals) / ARRIVAL_WINDOW_S

  def _drain_s(self) -> float:
    """Predicted seconds until the queue empties at the fastest rank (a Retry-After)."""
    fastest = self.engine.ranks[0]  # cheapest first
    batches = math.ceil(self.queued_rows / self.max_batch)
    units = max((p.request.units for p in self.queue), default=1.0)
    per_batch = self.latency.seconds(fastest, self.engine.bucket(self.max_batch), units)
    return batches * per_batch if math.isfinite(per_batch) else 1.0

  # --- the batching loop -----------------------------------------------------------------
  async def run(self) -> None:
    """Forms and runs batches until `stop()` and the queue is empty."""
    while True:
      if not self.queue:
        if self._stopping:
          return
        self._arrived.clear()
        await self._arrived.wait()
        continue
      batch = []
      try:
        await self._fill(self.queue[0])
        batch = self._take()
        if batch:
          await self._run_batch(batch)
      except Exception as error:  # a failed batch fails its requests, never the loop
        for p in batch:
          if not p.done.done():  # its client may have gone
            p.done.set_exception(error)

  async def _fill(self, head: Pending) -> None:
    """Waits (at most until head.arrival + max_wait_s) while the batch could still grow."""
    while not self._stopping and self._rows_like(head) < self.max_batch:
      left = head.arrival + self.max_wait_s - time.monotonic()
      if left <= 0:
        return
      self._arrived.clear()
      try:
        await asyncio.wait_for(self._arrived.wait(), left)
      except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
        return

  def _rows_like(self, head: Pending) -> int:
    return sum(p.request.rows for p in self.queue if p.request.rank == head.request.rank)

  def _take(self) -> list[Pending]:
    """The oldest live request and the live requests behind it with the same rank key, up to
    max_batch rows. Requests whose client went (or whose drain timed out) are dropped: nothing
    is computed for them."""
    batch, rows, rest = [], 0, collections.deque()
    for p in self.queue:
      if p.done.done():
        self.queued_rows -= p.request.rows
      elif (not batch or p.request.rank == batch[0].request.rank) and (
        rows + p.request.rows <= self.max_batch
      ):
        batch.append(p)
        rows += p.request.rows
      else:
        rest.append(p)
    self.queue = rest
    self.queued_rows -= rows
    return batch

  def _choose(self, batch: list[Pending], rows: int, units: float) -> tuple[Any, str]:
    if batch[0].request.rank is not None:
      return batch[0].request.rank, "request"
    backlog = self._backlog(rows, units, time.monotonic() - batch[0].arrival)
    return self.policy.choose(backlog), self.policy.name

  async def _run_batch(self, batch: list[Pending]) -> None:
    rows = sum(p.request.rows for p in batch)
    units = max(p.request.units for p in batch)
    rank, chosen_by = self._choose(batch, rows, units)
    size = self.engine.bucket(rows)
    start = time.monotonic()
    self._running = (start, self.latency.seconds(rank, size, units))
    try:
      results, units_run = await asyncio.get_running_loop().run_in_executor(
        self._device, self.engine.run, rank, size, [p.request for p in batch]
      )
    finally:
      self._running = None
    seconds = time.monotonic() - start
    self.latency.observe(rank, size, seconds / units_run)
    for p, result in zip(batch, results):
      info = BatchInfo(rank, size, rows, chosen_by, start - p.arrival, seconds)
      if not p.done.done():  # the client may have gone
        p.done.set_result((result, info))
    self.on_batch(BatchInfo(rank, size, rows, chosen_by, 0.0, seconds), rows)

  def stop(self) -> None:
    """Stops taking batches once the queue is empty (requests already queued are served)."""
    self._stopping = True
    self._arrived.set()
