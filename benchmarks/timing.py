"""The one timing helper every suite uses, JAX and PyTorch alike (pure Python, no jax import)."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
import statistics
import time


@dataclasses.dataclass(frozen=True)
class Policy:
  """How hard to time: `warmup` untimed calls, then `repeats` samples of `number` calls each,
  `number` chosen so one sample lasts at least `min_sample_s` seconds."""

  warmup: int
  repeats: int
  min_sample_s: float


POLICIES = {
  "tiny": Policy(warmup=1, repeats=3, min_sample_s=0.0),  # the smoke test: shape, not speed
  "full": Policy(warmup=2, repeats=9, min_sample_s=0.05),
}


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call: the median and the minimum over the samples."""

  median_s: float
  min_s: float
  number: int
  repeats: int


def time_fn(thunk: Callable[[], object], policy: Policy) -> Timing:
  """Times `thunk()`, which must return only once its work is done.

  Wrap jax calls in `jax.block_until_ready`; otherwise only the asynchronous dispatch is timed.
  Short calls are batched `number` to a sample so timer resolution and one-off scheduler
  hiccups do not dominate; the median resists the noise of a shared machine, the minimum shows
  what the hardware can do.
  """
  for _ in range(policy.warmup):
    thunk()
  one_call = _sample(thunk, 1)
  number = max(1, math.ceil(policy.min_sample_s / max(one_call, 1e-9)))
  samples = [_sample(thunk, number) for _ in range(policy.repeats)]
  return Timing(statistics.median(samples), min(samples), number, policy.repeats)


def _sample(thunk, number: int) -> float:
  start = time.perf_counter()
  for _ in range(number):
    thunk()
  return (time.perf_counter() - start) / number
