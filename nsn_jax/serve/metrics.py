"""What the server reports: Prometheus metrics (GET /metrics) and one JSON log line per event.

Each server has its own registry (two servers in one process, as in tests, never share counts).
JAX's persistent compilation cache reports hits and misses through `jax.monitoring` events,
counted here from process start: a warm restart shows hits where a cold one shows misses.
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import time

import jax
import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily

_CACHE_EVENTS = collections.Counter()
_EVENT_NAMES = {
  "/jax/compilation_cache/cache_hits": "hits",
  "/jax/compilation_cache/cache_misses": "misses",
}


def _count_cache_event(event: str, **_) -> None:
  if event in _EVENT_NAMES:
    _CACHE_EVENTS[_EVENT_NAMES[event]] += 1


jax.monitoring.register_event_listener(_count_cache_event)

# Seconds: from a microsecond classifier batch to a long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _CacheCollector:
  """The compilation cache's hit and miss counts as Prometheus counters."""

  def collect(self):
    for outcome in ("hits", "misses"):
      family = CounterMetricFamily(
        f"nsn_compile_cache_{outcome}", f"Persistent compilation cache {outcome} since start."
      )
      family.add_metric([], _CACHE_EVENTS[outcome])
      yield family


def cache_counts() -> dict[str, int]:
  return {outcome: _CACHE_EVENTS[outcome] for outcome in ("hits", "misses")}


class ServerMetrics:
  """Request counts and latencies per endpoint, rank and status; queue depth; batch sizes."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter(
      "nsn_requests", "Requests answered.", ["endpoint", "rank", "status"], registry=r
    )
    self.latency = prom.Histogram(
      "nsn_request_latency_seconds",
      "Arrival to response, served requests.",
      ["endpoint", "rank"],
      buckets=LATENCY_BUCKETS,
      registry=r,
    )
    self.queue_rows = prom.Gauge("nsn_queue_rows", "Rows waiting in the queue.", registry=r)
    self.batch_rows = prom.Histogram(
      "nsn_batch_rows",
      "Rows per executed batch.",
      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
      registry=r,
    )
    self.batches = prom.Counter(
      "nsn_batches", "Executed batches.", ["rank", "chosen_by"], registry=r
    )
    self.ready = prom.Gauge("nsn_ready", "1 once every program is compiled.", registry=r)
    r.register(_CacheCollector())

  def exposition(self) -> bytes:
    return prom.generate_latest(self.registry)


_LOG = logging.getLogger("nsn_jax.serve")


def log_event(event: str, **fields) -> None:
  """One structured log line on stderr: {"ts": unix seconds, "event": ..., **fields}."""
  if not _LOG.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _LOG.addHandler(handler)
    _LOG.setLevel(logging.INFO)
    _LOG.propagate = False
  _LOG.info(json.dumps({"ts": round(time.time(), 3), "event": event, **fields}))
