"""A long-lived worker process spoken to in JSON lines, for benchmarks whose contenders live in
different processes (or venvs) and must be timed alternately, never concurrently.

The parent sends one request a line, {"op": NAME, ...}; the worker answers each with one line
and then waits on its stdin, idle, while the parent times the other side. Standard library and
benchmarks.timing only: the project's venv and .venv-torch both import it.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import traceback

from benchmarks.timing import Policy, time_fn


class LineWorker:
  """The parent's side: starts `command` (cwd `cwd`, `env` added to this process's), sends
  requests, returns the replies. Its stderr goes to a scratch file, quoted when it fails."""

  def __init__(self, command: list[str], cwd=None, env: dict | None = None):
    self.command = command
    self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by close())
    self._process = subprocess.Popen(
      command,
      cwd=cwd,
      env={**os.environ, **(env or {})},
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self._stderr,
      text=True,
    )

  def request(self, op: str, **arguments) -> dict:
    """Sends {"op": op, **arguments}; the worker's reply. RuntimeError if it fails or dies."""
    try:
      self._process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
      self._process.stdin.flush()
      line = self._process.stdout.readline()
    except BrokenPipeError:
      line = ""
    reply = json.loads(line) if line else {"error": "the worker exited"}
    if "error" in reply:
      self._stderr.seek(0)
      raise RuntimeError(
        f"{shlex.join(self.command)}: {op} failed: {reply['error']}\n{self._stderr.read()[-3000:]}"
      )
    return reply

  def close(self) -> None:
    """Closes its stdin (the worker then exits) and waits for it."""
    if self._process.stdin and not self._process.stdin.closed:
      self._process.stdin.close()
    try:
      self._process.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
    self._stderr.close()

  def __enter__(self) -> LineWorker:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def serve(handlers: dict[str, Callable[..., dict]]) -> None:
  """The worker's side: answers each request line with `handlers[op](**arguments)` as one JSON
  line, or {"error": ...} (its traceback on stderr), until stdin closes. The replies go to the
  original stdout; whatever else the process prints, Python or a library's C code, to stderr."""
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  for line in sys.stdin:
    request = json.loads(line)
    try:
      reply = handlers[request.pop("op")](**request)
    except Exception as error:  # reported to the parent, which raises
      traceback.print_exc()
      reply = {"error": f"{type(error).__name__}: {error}"}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()


def timed(thunk: Callable[[], object], policy: dict) -> dict:
  """A "time" request's reply: `thunk` timed under `policy` (a `Policy` as a dict)."""
  timing = time_fn(thunk, Policy(**policy))
  return {"median_s": timing.median_s, "min_s": timing.min_s, "number": timing.number}


def process_threads() -> int | None:
  """How many OS threads this process runs now (its thread pools included); None off Linux."""
  status = pathlib.Path("/proc/self/status")
  lines = status.read_text().splitlines() if status.exists() else []
  return next((int(line.split()[1]) for line in lines if line.startswith("Threads:")), None)
