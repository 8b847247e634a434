"""Scalars to JSONL and TensorBoard event files, and a one-line progress report.

Only process 0 writes; other processes get a writer that does nothing, so callers never branch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from etils import epath
import jax


def say(message: str) -> None:
  """A status line on stderr from process 0 (the others stay quiet)."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


class MetricWriter:
  """Appends `{"step": s, name: value, ...}` lines to DIR/metrics.jsonl and TensorBoard events.

  A run resumed at `start_step` first drops what an earlier attempt logged after that step
  (those steps are replayed), so metrics.jsonl never holds a step twice. With `mirror_to`
  (e.g. a gs:// workdir's metrics/), `mirror()` copies both there, where TensorBoard and people
  on other machines can read them; appending to a bucket object is not possible, so the files
  are written locally and copied whole.
  """

  def __init__(
    self,
    directory: str,
    start_step: int = 0,
    enabled: bool | None = None,
    mirror_to: str | None = None,
  ):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.directory, self.mirror_to = directory, mirror_to
    self._jsonl = self._tb = None
    if self.enabled:
      os.makedirs(directory, exist_ok=True)
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it

      path = os.path.join(directory, "metrics.jsonl")
      _truncate_after(path, start_step)
      self._jsonl = open(path, "a")  # noqa: SIM115 - open for the writer's lifetime, see close()
      self._tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=start_step + 1)

  def logged(self, step: int) -> set[str]:
    """The names already written for `step` (what a resumed run need not write again)."""
    if not self.enabled:
      return set()
    self._jsonl.flush()
    with open(self._jsonl.name) as f:
      records = (json.loads(line) for line in f if _step_of(line) == step)
      return {k for record in records for k in record} - {"step"}

  def write(self, step: int, scalars: dict[str, float]) -> None:
    """Writes finite scalars; raises FloatingPointError on NaN/inf so a diverged run stops."""
    bad = [k for k, v in scalars.items() if not math.isfinite(v)]
    if bad:
      raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def mirror(self) -> None:
    """Copies metrics.jsonl and the TensorBoard events to `mirror_to` (if set), whole."""
    if not (self.enabled and self.mirror_to):
      return
    self._jsonl.flush()
    self._tb.flush()
    for root, _, files in os.walk(self.directory):
      for name in files:
        source = os.path.join(root, name)
        target = epath.Path(self.mirror_to) / os.path.relpath(source, self.directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source, "rb") as f:
          target.write_bytes(f.read())

  def close(self) -> None:
    if self.enabled:
      self.mirror()
      self._jsonl.close()
      self._tb.close()


def _truncate_after(path: str, step: int) -> None:
  """Rewrites the JSONL file at `path` without its lines for steps after `step` (atomically)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if (logged := _step_of(line)) is not None and logged <= step]
  if len(kept) != len(lines):
    with open(path + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)


def _step_of(line: str) -> int | None:
  """The step of a metrics line; None for a blank or torn one (a run killed mid-write)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class Progress:
  """Prints `step 300/1500 (20%) | loss 0.41 | 52.1 steps/s | ETA 0:00:23` to stderr."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total, self.start = total_steps, start_step
    self.t0 = time.perf_counter()

  def line(self, step: int, **fields: float) -> str:
    elapsed = time.perf_counter() - self.t0
    rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
    parts += [f"{k} {v:.4g}" for k, v in fields.items()]
    parts += [f"{rate:.1f} steps/s", f"ETA {eta_text}"]
    return " | ".join(parts)

  def report(self, step: int, **fields: float) -> None:
    say(self.line(step, **fields))
