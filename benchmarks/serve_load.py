"""Open-loop load on the model server: latency, throughput and accuracy against offered load for
the fixed (max-rank) and slo policies, and the server's cold and warm start.

  python -m benchmarks.serve_load                                    # full: ~5 min on 2 cores
  python -m benchmarks.serve_load --size tiny --out /tmp/load.json --plot /tmp/load.png
  python -m benchmarks.serve_load --workdir runs/serve_load \\
      --out docs/serving-load.json --plot docs/img/serving_load.png   # reuses a trained model

Steps: train (or reuse, from --workdir) an MLP wide enough that compute, not HTTP, bounds one
server; start `python -m nsn_jax.serve` on an empty compilation cache (cold), then restart it on
that cache (warm); measure its max-rank capacity closed loop; fire Poisson arrivals at multiples
of that capacity, open loop (each request sent on its schedule, whatever is outstanding), at the
fixed policy, then at a restarted server with the slo policy. Requests carry test-split images;
their labels stay with the client, which scores the served answers. Localhost only: client and
server share the CPUs (the environment record has the load average before and after).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import http.client
import json
import math
import os
import pathlib
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import ml_collections
import numpy as np

from benchmarks import run as bench_run
from benchmarks.common import Column, SuiteResult, summary_line, write_report
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
# One device, however the calling process is set up (the tests fake 8 CPU devices).
SERVER_ENV = {**os.environ, "XLA_FLAGS": ""}
POLICIES = ("fixed", "slo")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc's unit of CPU time


@dataclasses.dataclass(frozen=True)
class Size:
  """The model, what the server compiles, and how hard the client pushes."""

  hidden: tuple[int, ...]
  max_rank: int
  ranks: tuple[int, ...]  # the served ladder, smallest first
  train_steps: int
  per_request: int  # test images per request
  max_batch: int  # rows per server batch
  batch_sizes: tuple[int, ...]
  loads: tuple[float, ...]  # offered load, × the max-rank capacity
  load_s: float  # seconds of arrivals per load (fewer if max_requests runs out first)
  max_requests: int  # per load
  capacity_s: float  # closed-loop seconds measuring capacity (after half as long of warm-up)
  probe_requests: int  # one at a time: the per-request HTTP + JSON overhead
  slo_factor: float  # SLO = this × the max-rank full-batch latency measured at start-up
  workers: int  # client threads: the most requests in flight


SIZES = {
  # 8192 wide so that at R a 64-row batch (~36 ms) dwarfs a request's HTTP + JSON (~2 ms);
  # R ≤ 784 (the input width).
  "full": Size(
    hidden=(8192, 8192),
    max_rank=768,
    ranks=(12, 48, 96, 192, 384, 768),
    train_steps=300,
    per_request=16,
    max_batch=64,
    batch_sizes=(16, 32, 64),
    loads=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
    load_s=8.0,
    max_requests=4000,
    capacity_s=5.0,
    probe_requests=30,
    slo_factor=3.0,
    workers=192,
  ),
  # configs/default.py:smoke: shapes and plumbing, not speed.
  "tiny": Size(
    hidden=(32,),
    max_rank=8,
    ranks=(2, 4, 8),
    train_steps=20,
    per_request=4,
    max_batch=8,
    batch_sizes=(4, 8),
    loads=(0.5, 2.0),
    load_s=0.5,
    max_requests=30,
    capacity_s=0.5,
    probe_requests=4,
    # Its ~1 ms batches sit under ~10 ms of HTTP: an SLO of 3 batches would refuse everything.
    slo_factor=50.0,
    workers=16,
  ),
}

COLUMNS = (
  Column("policy", "policy"),
  Column("load", "load", ".2f"),
  Column("offered_rps", "offered/s", ".1f"),
  Column("achieved_rps", "served/s", ".1f"),
  Column("p50_ms", "p50 ms", ".1f"),
  Column("p99_ms", "p99 ms", ".1f"),
  Column("refused_frac", "refused", ".3f"),
  Column("failed_frac", "failed", ".3f"),
  Column("mean_rank", "rank", ".1f"),
  Column("accuracy", "accuracy", ".3f"),
  Column("mean_flops_frac", "FLOPs/dense", ".3f"),
  Column("device_busy_frac", "busy", ".2f"),
  Column("server_loop_cores", "loop CPU", ".2f"),
)


# --- the model and the requests ----------------------------------------------------------------


def model_config(size_name: str, data_dir: str) -> ml_collections.ConfigDict:
  """configs/default.py (its smoke miniature at size tiny), trained on exactly the ladder."""
  size = SIZES[size_name]
  config = default.get_config("smoke" if size_name == "tiny" else None)
  config.data.data_dir = data_dir
  config.model.hidden, config.model.max_rank = size.hidden, size.max_rank
  config.ranks.fixed = tuple(sorted(size.ranks, reverse=True))  # R leads: the anchor
  config.eval.ranks = size.ranks
  config.train.steps = size.train_steps
  if size_name == "full":
    config.optimizer.warmup_steps = 30
    config.train.log_every = 50
    config.train.checkpoint_every = config.eval.every = size.train_steps
  return config


def train(size_name: str, workdir: str, data_dir: str) -> dict:
  """Trains the benchmark's model in `workdir` (resuming or just evaluating a checkpoint found
  there); its shape, training time and test accuracy per served rank."""
  from nsn_jax.checkpoint import Checkpoints
  from nsn_jax.train_lib import train_and_evaluate

  config = model_config(size_name, data_dir)
  found = pathlib.Path(workdir, "checkpoints")
  before = max(Checkpoints(str(found)).steps(), default=0) if found.is_dir() else 0
  start = time.perf_counter()
  final = train_and_evaluate(config, workdir)
  size = SIZES[size_name]
  return {
    "workdir": workdir,
    "hidden": list(size.hidden),
    "max_rank": size.max_rank,
    "ranks": list(size.ranks),
    "train_steps": size.train_steps,
    "train_batch": config.train.batch_size,
    "steps_trained_here": max(0, size.train_steps - before),
    "train_s": time.perf_counter() - start,
    "offline_accuracy": {str(r): final[f"eval/rank_{r}/accuracy"] for r in size.ranks},
  }


def request_bodies(config, per_request: int) -> tuple[list[bytes], list[np.ndarray]]:
  """The test split as /v1/classify bodies of `per_request` images each (the raw uint8 pixels as
  `inputs_b64`, the compact form a client holding images sends; encoded once, so the load loop
  spends no CPU on encoding) and their labels."""
  from nsn_jax.data import pipeline

  split = pipeline.load_split(config.data, config.data.eval_split)
  # load_split scales the uint8 pixels to [0, 1]; ×255 and rounding restores them exactly.
  pixels = np.rint(split["image"] * 255).astype(np.uint8).reshape(len(split["image"]), -1)
  count = len(pixels) // per_request  # whole requests; the few left over are not sent
  rows = [slice(i * per_request, (i + 1) * per_request) for i in range(count)]
  packed = [base64.b64encode(pixels[s].tobytes()).decode() for s in rows]
  bodies = [json.dumps({"inputs_b64": b}).encode() for b in packed]
  return bodies, [np.asarray(split["label"][s]) for s in rows]


# --- the server --------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict]:
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  try:
    connection.request("GET", path)
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read())
  finally:
    connection.close()


class ServerProcess:
  """`python -m nsn_jax.serve` on a free local port; its JSON log lines go to `log_path` (a pipe
  nobody reads would fill up and stall the server)."""

  def __init__(
    self, workdir: str, flags: list[str], log_path: pathlib.Path, env: dict | None = None
  ):
    self.port, self.log_path, self.ready_s = _free_port(), log_path, None
    self.command = [sys.executable, "-m", "nsn_jax.serve", f"--workdir={workdir}", *flags]
    self.command.append(f"--port={self.port}")
    self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
    self.launched = time.perf_counter()
    self.process = subprocess.Popen(
      self.command,
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=self._log,
      env={**SERVER_ENV, **(env or {})},
    )

  def wait_ready(self, timeout_s: float = 600.0) -> float:
    """Seconds from launch to the first /readyz 200."""
    deadline = self.launched + timeout_s
    while time.perf_counter() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f"server exited {self.process.returncode}:\n{self.log_tail()}")
      with contextlib.suppress(OSError):  # not listening yet
        if _get(self.port, "/readyz")[0] == 200:
          return time.perf_counter() - self.launched
      time.sleep(0.02)
    raise RuntimeError(f"server not ready in {timeout_s} s:\n{self.log_tail()}")

  def model(self) -> dict:
    return _get(self.port, "/v1/model")[1]

  def events(self, name: str) -> list[dict]:
    """The server's log events called `name` so far (a line still being written is skipped)."""
    found = []
    for line in self.log_path.read_text().splitlines():
      with contextlib.suppress(ValueError):
        event = json.loads(line)
        if isinstance(event, dict) and event.get("event") == name:
          found.append(event)
    return found

  def cpu_seconds(self) -> tuple[float, float]:
    """CPU seconds so far of (the main thread: the event loop, i.e. HTTP, JSON and batching;
    every other thread: the device thread's Python and XLA's compute), from /proc."""
    main = other = 0.0
    for task in pathlib.Path(f"/proc/{self.process.pid}/task").iterdir():
      with contextlib.suppress(OSError):  # a thread that has just ended
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
        if task.name == str(self.process.pid):
          main += seconds
        else:
          other += seconds
    return main, other

  def log_tail(self, chars: int = 3000) -> str:
    return self.log_path.read_text()[-chars:]

  def stop(self) -> None:
    """SIGTERM (the server drains its queue); kills it if it does not exit in a minute."""
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGTERM)
    try:
      code = self.process.wait(60)
    except subprocess.TimeoutExpired:
      self.process.kill()
      code = self.process.wait()
    self._log.close()
    if code != 0:
      raise RuntimeError(f"server exited {code}:\n{self.log_tail()}")


@contextlib.contextmanager
def serving(workdir: str, flags: list[str], log_path: pathlib.Path, env: dict | None = None):
  """A ready ServerProcess (`env`: variables to add), stopped on exit (killed if the block
  raised)."""
  server = ServerProcess(workdir, flags, log_path, env)
  try:
    server.ready_s = server.wait_ready()
    yield server
  except BaseException:
    server.process.kill()
    server.process.wait()
    raise
  server.stop()


def snapshot(server: ServerProcess) -> dict:
  """Wall clock and CPU counters, for `usage` to difference."""
  loop, other = server.cpu_seconds()
  return {"unix": time.time(), "loop": loop, "other": other, "client": time.process_time()}


def usage(server: ServerProcess, before: dict) -> dict:
  """Since `before`: the share of wall time the device ran batches (the server's batch log),
  and the CPU cores each part kept busy (the server's event loop, its device and XLA threads,
  this client process)."""
  after = snapshot(server)
  start, end = before["unix"], after["unix"]
  wall = max(end - start, 1e-9)
  # A batch logs when it ends: it ran [ts - compute, ts]; count what overlaps the window.
  spans = [(e["ts"] - e["compute_ms"] / 1e3, e["ts"]) for e in server.events("batch")]
  overlaps = [min(b, end) - max(a, start) for a, b in spans if b > start and a < end]
  return {
    "device_busy_frac": min(1.0, sum(overlaps) / wall),  # ≤ 1 but for ts's ms rounding
    "batches": len(overlaps),
    "refused_by_server": sum(
      before["unix"] <= e["ts"] <= after["unix"] for e in server.events("refused")
    ),
    "server_loop_cores": (after["loop"] - before["loop"]) / wall,
    "server_compute_cores": (after["other"] - before["other"]) / wall,
    "client_cores": (after["client"] - before["client"]) / wall,
  }


def startup_record(server: ServerProcess, start: str, policy: str) -> dict:
  """How long `server` took to become ready, and how much of that was compiling."""
  (loaded,) = server.events("loaded")
  return {
    "start": start,
    "policy": policy,
    "launch_to_ready_s": server.ready_s,
    "load_s": loaded["load_s"],  # launch → checkpoint restored, imports included
    **server.model()["startup"],  # compile_s, measure_s, cache hits and misses
  }


def server_flags(size: Size, cache_dir: str) -> list[str]:
  """The flags both policies share."""
  return [
    f"--ranks={','.join(map(str, size.ranks))}",
    f"--max_batch={size.max_batch}",
    f"--batch_sizes={','.join(map(str, size.batch_sizes))}",
    f"--compilation_cache={cache_dir}",
  ]


# --- the client --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
  """One request: the HTTP status (0: no reply), seconds from its scheduled send to the whole
  reply, how late the client sent it, and for a 200 what the server says it did."""

  status: int
  latency_s: float
  lag_s: float
  correct: int = 0
  rank: int | None = None
  flops_frac: float | None = None
  queue_ms: float = 0.0
  compute_ms: float = 0.0


class Client:
  """POSTs the pre-encoded bodies over keep-alive connections, one per thread."""

  def __init__(self, port: int, bodies: list[bytes], labels: list[np.ndarray]):
    self.port, self.bodies, self.labels = port, bodies, labels
    self._local = threading.local()
    self._opened: list[http.client.HTTPConnection] = []

  def _connection(self, fresh: bool) -> http.client.HTTPConnection:
    connection = getattr(self._local, "connection", None)
    if connection is None or fresh:
      connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
      self._local.connection = connection
      self._opened.append(connection)
    return connection

  def _exchange(self, body: bytes) -> tuple[int, bytes]:
    for attempt in range(2):
      connection = self._connection(fresh=attempt > 0)
      try:
        connection.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        return reply.status, reply.read()
      except ConnectionError:  # a kept-alive connection the server had closed: once more
        connection.close()
      except (OSError, http.client.HTTPException):
        connection.close()
        break
    return 0, b""

  def post(self, index: int, due: float) -> Outcome:
    """Sends body `index` (mod their count), scheduled for perf_counter() time `due`."""
    sent = time.perf_counter()
    status, text = self._exchange(self.bodies[index % len(self.bodies)])
    latency = time.perf_counter() - due
    if status != 200:
      return Outcome(status, latency, sent - due)
    reply = json.loads(text)
    truth = self.labels[index % len(self.labels)]
    return Outcome(
      status,
      latency,
      sent - due,
      correct=int(np.sum(np.asarray(reply["labels"]) == truth)),
      rank=reply["rank"],
      flops_frac=reply["flops_frac_dense"],
      queue_ms=reply["queue_ms"],
      compute_ms=reply["compute_ms"],
    )

  def close(self) -> None:
    for connection in self._opened:
      connection.close()


def closed_loop(client: Client, clients: int, seconds: float) -> tuple[list[Outcome], float]:
  """`clients` threads each sending the next request as soon as the last returns, for
  `seconds`; (outcomes, seconds from the first send to the last reply)."""
  start = time.perf_counter()
  stop = start + seconds

  def worker(k: int) -> list[Outcome]:
    outcomes, index = [], k
    while time.perf_counter() < stop:
      outcomes.append(client.post(index, time.perf_counter()))
      index += clients
    return outcomes

  with concurrent.futures.ThreadPoolExecutor(clients) as pool:
    outcomes = [o for batch in pool.map(worker, range(clients)) for o in batch]
  return outcomes, time.perf_counter() - start


def open_loop(
  client: Client, pool, rate: float, count: int, seed: int
) -> tuple[list[Outcome], float]:
  """`count` requests at Poisson arrivals of `rate` per second (seeded exponential gaps), each
  handed to `pool` at its time whatever is still outstanding; (outcomes, seconds from the first
  scheduled send to the last reply)."""
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
  start = time.perf_counter() + 0.01
  futures = []
  for index, due in enumerate(start + np.cumsum(gaps) - gaps[0]):
    wait = due - time.perf_counter()
    if wait > 0:
      time.sleep(wait)
    futures.append(pool.submit(client.post, index, float(due)))
  outcomes = [future.result() for future in futures]
  return outcomes, time.perf_counter() - start


# --- measurements ------------------------------------------------------------------------------


def probe_overhead(client: Client, count: int) -> dict:
  """One request at a time: what a request costs besides the server's queue and compute (HTTP,
  JSON both ways, parsing, the client), ms."""
  outcomes = [client.post(i, time.perf_counter()) for i in range(count)]
  served = [o for o in outcomes if o.status == 200]
  if not served:
    raise RuntimeError(f"no request served while probing: statuses {[o.status for o in outcomes]}")
  return {
    "requests": len(outcomes),
    "overhead_ms": statistics.median(1e3 * o.latency_s - o.queue_ms - o.compute_ms for o in served),
    "latency_ms": statistics.median(1e3 * o.latency_s for o in served),
    "compute_ms": statistics.median(o.compute_ms for o in served),
  }


def measure_capacity(server: ServerProcess, client: Client, size: Size, table: dict) -> dict:
  """Max-rank capacity, closed loop (enough clients to queue a full batch behind the running
  one), against what compute alone allows (`table`: the start-up latencies, idle), and the CPU
  each part spends per request."""
  probe = probe_overhead(client, size.probe_requests)
  clients = 2 * max(1, size.max_batch // size.per_request)
  closed_loop(client, clients, size.capacity_s / 2)  # warm: connections, the latency window
  before = snapshot(server)
  outcomes, seconds = closed_loop(client, clients, size.capacity_s)
  used = usage(server, before)
  served = [o for o in outcomes if o.status == 200]
  rps = len(served) / seconds
  full_ms = table[f"{size.ranks[-1]}/{size.max_batch}"]
  loaded = [  # the full batches at R the closed loop ran: what R costs at capacity
    e["compute_ms"]
    for e in server.events("batch")
    if e["ts"] >= before["unix"]
    and str(e["rank"]) == str(size.ranks[-1])  # the log names a rank by its label, "768"
    and e["rows"] == size.max_batch
  ]
  request_compute_ms = full_ms * size.per_request / size.max_batch  # its share of a full batch
  return {
    "rank": size.ranks[-1],
    "clients": clients,
    "seconds": seconds,
    "requests": len(outcomes),
    "refused_or_failed": len(outcomes) - len(served),
    "capacity_rps": rps,
    "capacity_examples_per_s": rps * size.per_request,
    "compute_only_rps": 1e3 / request_compute_ms,
    "closed_loop_p50_ms": statistics.median(1e3 * o.latency_s for o in served),
    "full_batch_ms": full_ms,
    "loaded_full_batch_ms": statistics.median(loaded) if loaded else full_ms,
    "request_compute_ms": request_compute_ms,
    "smallest_rank_full_batch_ms": table[f"{size.ranks[0]}/{size.max_batch}"],
    **used,
    # CPU ms per served request: the event loop's (HTTP, JSON) against compute's.
    "loop_cpu_ms_per_request": 1e3 * used["server_loop_cores"] / rps,
    "compute_cpu_ms_per_request": 1e3 * used["server_compute_cores"] / rps,
    "client_cpu_ms_per_request": 1e3 * used["client_cores"] / rps,
    "probe": probe,
  }


def _percentile_ms(values: list[float], q: float) -> float | None:
  return 1e3 * float(np.percentile(values, q)) if values else None


def load_row(policy: str, load: float, rate: float, outcomes, seconds: float, extra: dict) -> dict:
  """One (policy, load) row: throughput, client latency of the 200s, refusals, the quality and
  cost of what was served, and where the time and CPU went."""
  n, served = len(outcomes), [o for o in outcomes if o.status == 200]
  examples, slo_s = extra.pop("per_request"), extra.pop("slo_ms") / 1e3
  ranks = [o.rank for o in served]
  return {
    "policy": policy,
    "load": load,
    "offered_rps": rate,
    "requests": n,
    "seconds": seconds,
    "achieved_rps": len(served) / seconds,
    "p50_ms": _percentile_ms([o.latency_s for o in served], 50),
    "p99_ms": _percentile_ms([o.latency_s for o in served], 99),
    "refused_frac": sum(o.status == 503 for o in outcomes) / n,
    "failed_frac": sum(o.status not in (200, 503) for o in outcomes) / n,
    "mean_rank": float(np.mean(ranks)) if ranks else None,
    "rank_counts": {str(r): ranks.count(r) for r in sorted(set(ranks))},
    "accuracy": sum(o.correct for o in served) / (examples * len(served)) if served else None,
    "mean_flops_frac": float(np.mean([o.flops_frac for o in served])) if served else None,
    # Of every example offered: answered correctly within the SLO (quality × timeliness).
    "correct_within_slo_frac": sum(o.correct for o in served if o.latency_s <= slo_s)
    / (examples * n),
    "queue_ms_p50": _percentile_ms([o.queue_ms / 1e3 for o in served], 50),
    "compute_ms_p50": _percentile_ms([o.compute_ms / 1e3 for o in served], 50),
    # Client latency the server's queue and compute times leave out: HTTP, JSON, the event
    # loop's backlog before a request is queued (the slo policy cannot see this part).
    "outside_ms_p99": _percentile_ms(
      [o.latency_s - (o.queue_ms + o.compute_ms) / 1e3 for o in served], 99
    ),
    "send_lag_p99_ms": _percentile_ms([o.lag_s for o in outcomes], 99),
    **extra,
  }


def _start_threads(pool: concurrent.futures.ThreadPoolExecutor, workers: int) -> None:
  """Starts every worker now: a thread started on demand mid-load waits for the GIL before the
  scheduler may go on, which delayed bursts of sends by ~100 ms."""
  barrier = threading.Barrier(workers + 1)
  for _ in range(workers):
    pool.submit(barrier.wait)
  barrier.wait()


@contextlib.contextmanager
def _prompt_threads(interval_s: float = 5e-4):
  """A shorter GIL switch interval (default 5 ms) while loading: the scheduling thread sends on
  time and a reply is read as it comes, although workers are parsing other replies."""
  default_s = sys.getswitchinterval()
  sys.setswitchinterval(interval_s)
  try:
    yield
  finally:
    sys.setswitchinterval(default_s)


def run_loads(
  policy: str, server: ServerProcess, client: Client, size: Size, capacity_rps: float, slo_ms
) -> list[dict]:
  """Every offered load of `size` in turn on `server`; the same arrival times for each policy
  (seeded by the load's index)."""
  rows = []
  with concurrent.futures.ThreadPoolExecutor(size.workers) as pool, _prompt_threads():
    _start_threads(pool, size.workers)
    for i, load in enumerate(size.loads):
      rate = load * capacity_rps
      count = max(8, min(size.max_requests, math.ceil(rate * size.load_s)))
      before = snapshot(server)
      outcomes, seconds = open_loop(client, pool, rate, count, seed=i)
      extra = {"per_request": size.per_request, "slo_ms": slo_ms, **usage(server, before)}
      rows.append(load_row(policy, load, rate, outcomes, seconds, extra))
      print(bench_run.format_table(rows[-1:], COLUMNS), flush=True)
  return rows


# --- the whole benchmark -----------------------------------------------------------------------


def fixed_phase(workdir: str, flags: list[str], size: Size, data, tmp: pathlib.Path) -> dict:
  """The fixed-policy server: cold start, warm restart, capacity at R, the SLO, every load."""
  with serving(workdir, flags, tmp / "cold.log") as server:
    startups = [startup_record(server, "cold", "fixed")]
  with serving(workdir, flags, tmp / "fixed.log") as server:
    startups.append(startup_record(server, "warm", "fixed"))
    served = server.model()
    client = Client(server.port, *data)
    capacity = measure_capacity(server, client, size, served["latency_ms_per_unit"])
    slo_ms = math.ceil(size.slo_factor * capacity["loaded_full_batch_ms"])
    rows = run_loads("fixed", server, client, size, capacity["capacity_rps"], slo_ms)
    client.close()
    after = server.model()["latency_ms_per_unit"]
  tables = {"startup": served["latency_ms_per_unit"], "after": after}
  return {
    "served": served,
    "startups": startups,
    "capacity": capacity,
    "slo_ms": slo_ms,
    "rows": rows,
    "tables": tables,
  }


def slo_phase(workdir, flags, size: Size, data, tmp: pathlib.Path, capacity_rps: float, slo_ms):
  """The slo-policy server (warm start), warmed up as the fixed one was, then every load."""
  with serving(workdir, flags, tmp / "slo.log") as server:
    startup = startup_record(server, "warm", "slo")
    table = server.model()["latency_ms_per_unit"]
    client = Client(server.port, *data)
    probe = probe_overhead(client, size.probe_requests)
    closed_loop(client, 2 * max(1, size.max_batch // size.per_request), size.capacity_s / 2)
    rows = run_loads("slo", server, client, size, capacity_rps, slo_ms)
    client.close()
    tables = {"startup": table, "after": server.model()["latency_ms_per_unit"]}
  return {"startup": startup, "probe": probe, "rows": rows, "tables": tables}


def measure(size_name: str, workdir: str | None, data_dir: str, tmp: pathlib.Path) -> dict:
  """Trains, starts the servers and runs every load; the report's measurements."""
  size = SIZES[size_name]
  workdir = os.path.abspath(workdir or tmp / "model")
  model = train(size_name, workdir, data_dir)
  data = request_bodies(model_config(size_name, data_dir), size.per_request)
  flags = server_flags(size, str(tmp / "xla"))  # an empty cache: the first start is cold
  fixed = fixed_phase(workdir, ["--policy=fixed", *flags], size, data, tmp)
  slo_ms, rps = fixed["slo_ms"], fixed["capacity"]["capacity_rps"]
  slo_flags = ["--policy=slo", f"--slo_ms={slo_ms}", "--slo_percentile=99", *flags]
  slo = slo_phase(workdir, slo_flags, size, data, tmp, rps, slo_ms)
  model["served"] = fixed["served"]["ranks"]  # FLOPs and FLOPs / dense per rank
  return {
    "model": model,
    "requests": {"examples_per_request": size.per_request, "distinct_bodies": len(data[0])},
    "server": {
      "fixed": ["--policy=fixed", *flags],
      "slo": slo_flags,
      "env": {"XLA_FLAGS": SERVER_ENV["XLA_FLAGS"]},
    },
    "client": {"workers": size.workers, "load_s": size.load_s, "max_requests": size.max_requests},
    "capacity": fixed["capacity"],
    "slo_ms": slo_ms,
    "slo_basis": f"{size.slo_factor:g} × the median latency of a full {size.max_batch}-row "
    "batch at R while the closed loop measured capacity",
    "slo_probe": slo["probe"],
    "latency_tables_ms": {"fixed": fixed["tables"], "slo": slo["tables"]},
    "startup": [*fixed["startups"], slo["startup"]],
    "rows": fixed["rows"] + slo["rows"],
  }


def summarize(report: dict, judged: bool) -> list[dict]:
  """The issue's targets, met or missed (judged only at size full), and the numbers behind."""
  cap, slo_ms = report["capacity"], report["slo_ms"]
  at = {(r["policy"], r["load"]): r for r in report["rows"]}
  loads = sorted({r["load"] for r in report["rows"]})
  heavy = 2.0 if 2.0 in loads else loads[-1]
  fixed, slo, slo_light = at["fixed", heavy], at["slo", heavy], at["slo", loads[0]]
  cold, warm = report["startup"][0], report["startup"][1]
  x = f"{heavy:g}x capacity"
  line = functools.partial(summary_line, judged=judged)
  return [
    line("closed loop at R: device busy fraction", cap["device_busy_frac"], at_least=0.8),
    line(
      "closed loop at R: server event-loop CPU (HTTP, JSON) / compute CPU, per request",
      cap["loop_cpu_ms_per_request"] / cap["compute_cpu_ms_per_request"],
      at_most=0.25,
    ),
    line(
      "closed loop at R: capacity / what compute alone allows (idle start-up latency)",
      cap["capacity_rps"] / cap["compute_only_rps"],
    ),
    line(
      "full-batch latency at R / at the smallest served rank (start-up, idle)",
      cap["full_batch_ms"] / cap["smallest_rank_full_batch_ms"],
      at_least=4,
    ),
    line(f"{x}: slo p99 / SLO ({slo_ms} ms)", (slo["p99_ms"] or math.inf) / slo_ms, at_most=1),
    line(f"{x}: fixed p99 / SLO (> 1: R misses it)", (fixed["p99_ms"] or 0) / slo_ms, at_least=1),
    line(
      f"slo: accuracy drop from {loads[0]:g}x to {heavy:g}x capacity",
      (slo_light["accuracy"] or 0.0) - (slo["accuracy"] or 0.0),  # None: nothing served
      at_most=0.05,
    ),
    line(
      f"{x}: slo fraction answered", 1 - slo["refused_frac"] - slo["failed_frac"], at_least=0.99
    ),
    line(
      f"{x}: examples answered correctly within the SLO, slo / fixed",
      slo["correct_within_slo_frac"] / max(fixed["correct_within_slo_frac"], 1e-9),
    ),
    line(
      "warm / cold start: launch-to-ready speed-up (imports, restore, compile, measure)",
      cold["launch_to_ready_s"] / warm["launch_to_ready_s"],
      at_least=5,
    ),
    line(
      "warm / cold start: server compile_s speed-up (compiling every program only)",
      cold["compile_s"] / max(warm["compile_s"], 1e-9),
      at_least=5,
    ),
  ]


def notes(report: dict) -> list[str]:
  cap, cpus = report["capacity"], report["environment"]["cpus_usable"]
  return [
    f"capacity at R: {cap['capacity_rps']:.1f} req/s closed loop ({cap['clients']} clients) vs "
    f"{cap['compute_only_rps']:.1f} req/s that compute alone allows (start-up latency, idle). "
    f"CPU per request: event loop {cap['loop_cpu_ms_per_request']:.2f} ms, compute "
    f"{cap['compute_cpu_ms_per_request']:.2f} ms, client {cap['client_cpu_ms_per_request']:.2f}"
    f" ms; one request alone spends {cap['probe']['overhead_ms']:.2f} ms outside the server's "
    "queue and compute",
    f"client and server share {cpus} CPUs (and the machine's other users: see the load "
    "average): the client and the server's HTTP/JSON take CPU from XLA, more so at high load. "
    "Latency is client-measured from each request's scheduled send (open loop); busy is the "
    "share of wall time the device ran batches, loop CPU the cores the server's event loop used",
    "cold: the fixed-policy server on an empty compilation cache; warm: the same command "
    "restarted on that cache (and the slo server after it). launch-to-ready includes Python and "
    "JAX imports and the checkpoint restore, which no cache skips; compile_s is the server's own",
    "accuracy: served labels against the test split's, over the 200 responses",
  ]


def environment(argv: list[str], module: str = "benchmarks.serve_load") -> dict:
  """benchmarks.run's record (with the CPU model), this command and the machine's load."""
  env = bench_run.environment(argv, module)
  env["load_average_before"] = list(os.getloadavg())  # 1, 5, 15 min
  env["threads"] = {"benchmark_process": threading.active_count()}
  return env


def plot(report: dict, path: str) -> None:
  """p99 latency (log scale, the SLO dashed) and accuracy against offered load, a line each
  policy; the offline accuracy of R and of the smallest rank as references."""
  from nsn_jax.studies.common import pyplot

  plt = pyplot()
  fig, (lat, acc) = plt.subplots(1, 2, figsize=(10, 4))
  for policy in POLICIES:
    rows = [r for r in report["rows"] if r["policy"] == policy]
    loads = [r["load"] for r in rows]
    lat.plot(loads, [r["p99_ms"] or np.nan for r in rows], "o-", label=policy)
    acc.plot(loads, [r["accuracy"] or np.nan for r in rows], "o-", label=policy)
  lat.axhline(report["slo_ms"], color="k", linestyle="--", linewidth=1, label="SLO")
  lat.set_yscale("log")
  lat.set_ylabel("p99 latency, ms (client)")
  offline = report["model"]["offline_accuracy"]
  for rank, style in ((max(offline, key=int), ":"), (min(offline, key=int), "-.")):
    acc.axhline(offline[rank], color="grey", linestyle=style, linewidth=1, label=f"rank {rank}")
  acc.set_ylabel("accuracy of served answers")
  for ax in (lat, acc):
    ax.set_xlabel("offered load, × max-rank capacity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  m = report["model"]
  fig.suptitle(
    f"MLP {m['hidden']}, R={m['max_rank']}, ranks {m['ranks']}: "
    f"capacity {report['capacity']['capacity_rps']:.0f} req/s at R",
    fontsize=9,
  )
  fig.tight_layout()
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.serve_load",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--size", choices=tuple(SIZES), default="full")
  parser.add_argument("--out", help="JSON to write (default: runs/benchmarks/serve_load_SIZE.json)")
  parser.add_argument("--plot", help="PNG to draw (default: none)")
  parser.add_argument("--workdir", help="the model's workdir, reused if trained (default: a temp)")
  parser.add_argument("--data_dir", default="runs/tfds", help="TFDS data_dir holding mnist5k")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints the table and the targets, writes the JSON (and the plot)."""
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  env = environment(argv)
  print(f"{env['cpu_model']}, {env['cpus_usable']} CPUs, load {env['load_average_before']}")
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="nsn_serve_load_") as tmp:
    report = {"environment": env, "size": args.size}
    report.update(measure(args.size, args.workdir, args.data_dir, pathlib.Path(tmp)))
  env["load_average_after"] = list(os.getloadavg())
  report["run_s"] = time.perf_counter() - start
  result = SuiteResult(report["rows"], summarize(report, args.size == "full"), notes(report), ())
  report["summary"], report["notes"] = result.summary, result.notes
  print(f"\n== serve_load (size {args.size}, SLO {report['slo_ms']} ms) ==")
  print(bench_run.format_table(report["rows"], COLUMNS))
  print(bench_run.format_summary(result))
  out = write_report(args.out or f"runs/benchmarks/serve_load_{args.size}.json", report)
  if args.plot:
    plot(report, args.plot)
  print(f"\nwrote {out}" + (f" and {args.plot}" if args.plot else ""))
  return report


if __name__ == "__main__":
  main()
