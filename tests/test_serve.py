"""The model server: policies and batching in-process, then the real server over real HTTP.

The classifier server runs as `python -m nsn_jax.serve` in a subprocess on a free local port,
on a checkpoint trained here (configs/default.py:smoke); a stub engine whose batches block until
released makes overload deterministic.
"""

import asyncio
import base64
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from flax import nnx
import jax
import numpy as np
import pytest

from nsn_jax.restore import restore_model
from nsn_jax.serve.app import Server, create_app
from nsn_jax.serve.batcher import Batcher, Overloaded
from nsn_jax.serve.engine import Parsed, RequestError
from nsn_jax.serve.options import ServeOptions
from nsn_jax.serve.policy import Backlog, FixedPolicy, LatencyModel, SloPolicy
from nsn_jax.train_lib import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def call(port: int, path: str, body=None, raw: bytes | None = None):
  """(status, JSON reply, headers) of GET `path`, or POST of `body` as JSON (or `raw` bytes)."""
  data = raw if raw is not None else None if body is None else json.dumps(body).encode()
  request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data)
  try:
    with urllib.request.urlopen(request, timeout=60) as reply:
      text = reply.read()
      status, headers = reply.status, reply.headers
  except urllib.error.HTTPError as e:
    text, status, headers = e.read(), e.code, e.headers
  try:
    return status, json.loads(text), headers
  except ValueError:
    return status, text.decode(), headers


def wait_ready(port: int, process=None, timeout: float = 120) -> list[int]:
  """Polls /readyz until 200; returns every status seen (the server must be up first)."""
  seen, deadline = [], time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process is not None and process.poll() is not None:
      raise AssertionError(f"server exited {process.returncode}: {process.stderr.read()}")
    try:
      seen.append(call(port, "/readyz")[0])
      if seen[-1] == 200:
        return seen
    except OSError:
      pass  # not listening yet
    time.sleep(0.05)
  raise AssertionError(f"not ready in {timeout} s; saw {seen[-5:]}")


def start_server(workdir, tmp_path, *flags):
  port = free_port()
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "nsn_jax.serve",
      f"--workdir={workdir}",
      f"--port={port}",
      f"--compilation_cache={tmp_path}/xla",
      *flags,
    ],
    cwd=REPO,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"},
  )
  return process, port


def stop_server(process) -> tuple[int, str]:
  process.send_signal(signal.SIGTERM)
  try:
    _, err = process.communicate(timeout=60)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  return process.returncode, err


@pytest.fixture(scope="module")
def workdir(data_dir, tmp_path_factory):
  from configs import default

  config = default.get_config("smoke")
  config.data.data_dir = data_dir
  path = tmp_path_factory.mktemp("serve") / "run"
  train_and_evaluate(config, str(path))
  return str(path)


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
  """(port, readiness statuses) of a slo-policy classifier server on ranks 2, 4, 8."""
  tmp = tmp_path_factory.mktemp("server")
  process, port = start_server(
    workdir, tmp, "--policy=slo", "--slo_ms=2000", "--ranks=2,4,8", "--max_batch=8"
  )
  statuses = wait_ready(port, process)
  yield port, statuses
  code, err = stop_server(process)
  assert code == 0, err[-2000:]


# --- policies and batching, in-process -----------------------------------------------------


def test_slo_policy_picks_the_largest_rank_that_keeps_the_slo():
  latency = LatencyModel(percentile=99)
  for rank, seconds in ((1, 0.001), (4, 0.004), (16, 0.016)):
    for _ in range(5):
      latency.observe(rank, 8, seconds)
  policy = SloPolicy([1, 4, 16], latency, slo_s=0.05, max_batch=8, bucket_of=lambda rows: 8)
  idle = Backlog(8, 1.0, 0.0, 0, 0.0, 0.0)
  assert policy.choose(idle) == 16
  # 3 batches behind (24 rows), oldest waiting 20 ms: rank 16 would end at 20 + 16 + 48 ms > 50.
  busy = Backlog(8, 1.0, 0.0, 24, 1.0, 0.020)
  assert policy.choose(busy) == 4
  assert policy.overloaded(Backlog(0, 0.0, 0.0, 8, 1.0, 0.0)) is None
  # 800 rows: 100 batches of 1 ms at the fastest rank, 50 ms over the SLO.
  assert policy.overloaded(Backlog(0, 0.0, 0.0, 800, 1.0, 0.0)) == pytest.approx(0.05)
  assert policy.choose(Backlog(8, 1.0, 1.0, 0, 0.0, 0.0)) == 1  # hopeless: the fastest
  # Rank 16's full batches serve 500 rows/s: offered 1,000 rows/s, the queue would grow.
  assert policy.choose(dataclasses.replace(idle, arrival_rows_per_s=1000)) == 4
  assert SloPolicy([8], LatencyModel(99), 0.05, 8, lambda r: 8).choose(idle) == 8
  assert FixedPolicy(16).choose(busy) == 16 and FixedPolicy(16).overloaded(busy) is None


class StubEngine:
  """An engine whose batches block until `release` is set; records each batch's rank."""

  kind, ranks, batch_sizes, step, max_rank, store = "classify", (2, 8), (4,), 7, 8, None
  config = type("C", (), {"task": "image_classification"})

  def __init__(self):
    self.release, self.batches = threading.Event(), []

  def bucket(self, rows):
    return 4

  def programs(self):
    return [(8, 4), (2, 4)]

  def compile(self, rank, size):
    pass

  def flops(self, rank):
    return 10 * rank

  def label(self, rank):
    return str(rank)

  def describe_point(self, rank):
    return {"rank": rank, "flops": 10 * rank}

  def warm_up_request(self, size):
    return [Parsed(None, size, 1.0, None, None)]

  def parse(self, body, max_rows):
    if "rows" not in body:
      raise RequestError(422, "rows: missing")
    return Parsed(body.get("fail"), body["rows"], 1.0, body.get("rank"), None)

  def run(self, rank, size, requests):
    self.release.wait(30)
    if any(r.inputs for r in requests):
      raise RuntimeError("device lost")
    self.batches.append((rank, sum(r.rows for r in requests)))
    return [{"rows": r.rows} for r in requests], 1.0


def test_batcher_groups_by_rank_and_refuses_a_full_queue():
  async def scenario():
    engine = StubEngine()
    batcher = Batcher(engine, FixedPolicy(8), LatencyModel(99), 4, 0.01, max_queue=9)
    loop_task = asyncio.create_task(batcher.run())
    now = time.monotonic
    first = batcher.submit(Parsed(None, 4, 1.0, None, None), now())  # runs at once and blocks
    await asyncio.sleep(0.05)
    gone = batcher.submit(Parsed(None, 1, 1.0, 2, None), now())
    gone.cancel()  # its client went: never computed
    queued = [
      batcher.submit(Parsed(None, rows, 1.0, rank, None), now())
      for rows, rank in ((1, None), (2, 2), (3, None), (2, 2))
    ]
    with pytest.raises(Overloaded, match="queue full") as refused:
      batcher.submit(Parsed(None, 1, 1.0, None, None), now())
    assert refused.value.retry_after_s > 0
    engine.release.set()
    results = await asyncio.gather(first, *queued)
    batcher.stop()
    await loop_task
    return engine.batches, results

  batches, results = asyncio.run(scenario())
  # The open-rank requests (1 + 3 rows) ran together at the policy's rank, the rank-2 ones apart.
  assert batches == [(8, 4), (8, 4), (2, 4)]
  assert [info.chosen_by for _, info in results] == [
    "fixed",
    "fixed",
    "request",
    "fixed",
    "request",
  ]


def test_options_are_checked_before_anything_loads():
  ok = ServeOptions(path="x").validate()
  assert ok.compiled_batch_sizes() == (1, 4, 16, 32)
  assert ok.ladder(64) == (1, 2, 4, 8, 16, 32, 64)
  assert ServeOptions(path="x", ranks="3,5", rank=7).ladder(8) == (3, 5, 7)
  for bad, match in (
    (dict(policy="best"), "--policy='best'"),
    (dict(policy="slo"), "--slo_ms=None"),
    (dict(max_batch=0), "--max_batch=0"),
    (dict(batch_sizes=(1, 64)), "--batch_sizes='1,64'"),
    (dict(max_queue=4), "--max_queue=4"),
    (dict(ranks="1,x"), "--ranks='1,x'"),
    (dict(max_new_tokens=600), "--max_new_tokens=600"),
  ):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
      ServeOptions(path="x", **bad).validate()
  with pytest.raises(ValueError, match=r"ranks \[9\] are outside"):
    ServeOptions(path="x", ranks="2,9").ladder(8)
  with pytest.raises(ValueError, match="has no ranks"):
    ServeOptions(path="x", rank=2).ladder(None)


def test_overload_gives_503_with_retry_after_and_the_queue_is_still_served():
  import uvicorn

  engine = StubEngine()
  options = ServeOptions(path="stub", max_batch=4, max_queue=4, max_wait_ms=1)
  server = Server(engine, options)
  port = free_port()
  config = uvicorn.Config(create_app(server), port=port, log_level="warning")
  uv = uvicorn.Server(config)
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  try:
    engine.release.set()  # warm-up runs
    wait_ready(port)
    engine.release.clear()
    replies = []
    posters = [
      threading.Thread(target=lambda: replies.append(call(port, "/v1/classify", {"rows": 4})))
      for _ in range(3)
    ]
    for t in posters:  # one runs (blocked), one waits, the third finds the queue full
      t.start()
      time.sleep(0.2)
    posters[-1].join(10)
    status, reply, headers = replies[-1]
    assert status == 503 and "queue full" in reply["error"]
    assert int(headers["Retry-After"]) >= 1
    assert call(port, "/healthz")[0] == 200  # health is answered while the device is busy
    engine.release.set()
    for t in posters:
      t.join(10)
    assert sorted(r[0] for r in replies) == [200, 200, 503]
    assert call(port, "/v1/classify", {"nope": 1})[:2] == (422, {"error": "rows: missing"})
    # A batch that fails answers 500 and the next batch is served.
    failed = call(port, "/v1/classify", {"rows": 1, "fail": True})
    assert failed[:2] == (500, {"error": "inference failed: RuntimeError: device lost"})
    assert call(port, "/v1/classify", {"rows": 1})[0] == 200
  finally:
    engine.release.set()
    uv.should_exit = True
    thread.join(10)


# --- the real server over HTTP ---------------------------------------------------------------


def test_ready_only_after_every_program_is_compiled(server):
  port, statuses = server
  assert statuses[0] == 503 and statuses[-1] == 200
  status, info, _ = call(port, "/v1/model")
  assert status == 200 and info["ready"] and info["kind"] == "classify"
  assert [r["rank"] for r in info["ranks"]] == [2, 4, 8] and info["batch_sizes"] == [1, 4, 8]
  assert len(info["latency_ms_per_unit"]) == 9  # every program measured before ready
  assert call(port, "/healthz")[0] == 200


def test_served_ranks_equal_the_restored_model(server, workdir):
  port, _ = server
  images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1))
  model = restore_model(workdir).model
  info = {r["rank"]: r for r in call(port, "/v1/model")[1]["ranks"]}
  for rank in (2, 8):
    status, reply, _ = call(port, "/v1/classify", {"inputs": images.tolist(), "rank": rank})
    assert status == 200, reply
    assert reply["rank"] == rank and reply["chosen_by"] == "request"
    assert reply["flops"] == info[rank]["flops"]
    expected = jax.nn.softmax(model(images.astype(np.float32) / 255.0, rank=rank))
    np.testing.assert_allclose(reply["probabilities"], expected, rtol=1e-5, atol=1e-7)
    assert reply["labels"] == np.argmax(expected, -1).tolist()
  # The same pixels as base64 bytes give the same answer.
  packed = base64.b64encode(images.astype(np.uint8).tobytes()).decode()
  status, again, _ = call(port, "/v1/classify", {"inputs_b64": packed, "rank": 8})
  assert status == 200 and again["probabilities"] == reply["probabilities"]
  # A budget runs at the largest served rank whose FLOPs fit in it (of rank R's FLOPs here).
  fraction = info[4]["flops"] / info[8]["flops"]
  status, reply, _ = call(port, "/v1/classify", {"inputs": images[:1].tolist(), "budget": fraction})
  assert (status, reply["rank"], reply["budget"]) == (200, 4, fraction)
  # Neither: the slo policy decides; idle, with a generous SLO, it serves the largest rank.
  status, reply, _ = call(port, "/v1/classify", {"inputs": images[:1].reshape(1, -1).tolist()})
  assert (status, reply["rank"], reply["chosen_by"]) == (200, 8, "slo")


BAD_REQUESTS = [
  (b"{not json", 400, "not valid JSON"),
  (b"[1, 2]", 422, "a JSON object"),
  (b"[" * 200_000 + b"]" * 200_000, 400, "RecursionError"),
  ({"inputs": [[10**400] * 784]}, 422, "inputs"),
  ({"inputs": [[0] * 784], "rnak": 2}, 422, "unknown fields ['rnak']"),
  ({}, 422, "inputs or inputs_b64: give one"),
  ({"inputs": [[0] * 784], "inputs_b64": ""}, 422, "inputs or inputs_b64: give one"),
  ({"inputs_b64": "%%%"}, 422, "inputs_b64: not base64"),
  ({"inputs_b64": "AAAA"}, 422, "inputs_b64: 3 bytes; valid: base64 of N × 784"),
  ({"inputs": [[0] * 10]}, 422, "shape [1, 10]"),
  ({"inputs": [[0] * 784, [0] * 783]}, 422, "not a rectangular array"),
  ({"inputs": [["a"] * 784]}, 422, "not a rectangular array"),
  ({"inputs": [[300] * 784]}, 422, "outside [0, 255]"),
  ({"inputs": []}, 422, "shape [0]"),
  ({"inputs": [[0] * 784], "rank": 3}, 422, "rank=3: valid: a served rank, one of [2, 4, 8]"),
  ({"inputs": [[0] * 784], "rank": True}, 422, "rank=True"),
  ({"inputs": [[0] * 784], "rank": "8"}, 422, "rank='8'"),
  ({"inputs": [[0] * 784], "budget": 1.5}, 422, "budget=1.5"),
  ({"inputs": [[0] * 784], "budget": 0.001}, 422, "the cheapest served, 2, costs"),
  ({"inputs": [[0] * 784], "rank": 2, "budget": 0.5}, 422, "not both"),
  ({"inputs": [[0] * 784] * 9}, 413, "9 examples: valid: at most 8"),
]


@pytest.mark.parametrize("body,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_one_line(server, body, status, message):
  port, _ = server
  raw = body if isinstance(body, bytes) else None
  got, reply, _ = call(port, "/v1/classify", None if raw else body, raw=raw)
  assert got == status and message in reply["error"], reply
  assert "\n" not in reply["error"]


def test_the_server_stays_healthy_and_reports_metrics(server):
  port, _ = server
  assert call(port, "/v1/generate", {"prompt": "x"})[:2] == (
    404,
    {"error": "this server holds a classify model: POST /v1/classify"},
  )
  assert call(port, "/v1/classify")[0] == 405
  status, reply, _ = call(port, "/v1/classify", {"inputs": [[0] * 784], "rank": 2})
  assert status == 200
  status, text, _ = call(port, "/metrics")
  assert status == 200
  assert 'nsn_requests_total{endpoint="classify",rank="2",status="200"}' in text
  assert 'nsn_requests_total{endpoint="classify",rank="None",status="422"}' in text
  for name in (
    "nsn_request_latency_seconds_bucket",
    "nsn_queue_rows",
    "nsn_batch_rows_count",
    "nsn_compile_cache_misses_total",
    "nsn_ready 1.0",
  ):
    assert name in text


def test_sigterm_serves_the_queue_then_exits_0(workdir, tmp_path):
  # Batches wait up to 1.5 s to fill: SIGTERM arrives while the requests sit in the queue.
  process, port = start_server(
    workdir, tmp_path, "--ranks=8", "--max_wait_ms=1500", "--batch_sizes=1,8", "--max_batch=8"
  )
  wait_ready(port, process)
  replies = []
  posters = [
    threading.Thread(
      target=lambda: replies.append(call(port, "/v1/classify", {"inputs": [[0] * 784]}))
    )
    for _ in range(3)
  ]
  for t in posters:
    t.start()
  time.sleep(0.5)
  code, err = stop_server(process)
  for t in posters:
    t.join(10)
  assert code == 0, err[-2000:]
  assert [r[0] for r in replies] == [200, 200, 200]
  assert [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")][
    -1
  ] == "stopped"


def test_cli_refuses_bad_flags_and_paths_in_one_line(tmp_path):
  def run(*flags):
    return subprocess.run(
      [sys.executable, "-m", "nsn_jax.serve", *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )

  bad = run(f"--workdir={tmp_path}", "--policy=slo")
  assert bad.returncode == 2 and "--slo_ms=None" in bad.stderr and "Traceback" not in bad.stderr
  missing = run(f"--workdir={tmp_path}/none")
  assert missing.returncode == 2 and "no checkpoint in" in missing.stderr
  assert len(missing.stderr.strip().splitlines()) == 1


def test_parse_keeps_what_eval_reads(workdir):
  """An image request's values are preprocessed as eval.py's data pipeline does."""
  from nsn_jax.serve.classify import Classifier

  engine = Classifier(restore_model(workdir), (8,), (1,))
  parsed = engine.parse({"inputs": [[[255] * 28] * 28]}, 8)
  # Shaped as the dataset's images, as eval.py feeds them (any image model, not only the MLP).
  assert parsed.inputs["image"].shape == (1, 28, 28, 1) and parsed.inputs["image"].max() == 1.0
  results, _ = engine.run(8, 1, [parsed])
  model = restore_model(workdir).model
  expected = nnx.jit(lambda m, x: jax.nn.softmax(m(x, rank=8)))(
    model, np.ones((1, 784), np.float32)
  )
  np.testing.assert_allclose(results[0]["probabilities"], expected, rtol=1e-5)


def test_flexrank_profiles_are_served_by_budget(workdir):
  """A profile server's points are the profiles, cheapest first; a budget picks the most
  expensive that fits, and a profile's outputs are the model's at that profile."""
  from flax.core import FrozenDict

  from nsn_jax.serve.classify import Classifier

  restored = restore_model(workdir)
  cheap, rich = FrozenDict({"hidden/0": 2}), FrozenDict({"hidden/0": 6})
  engine = Classifier(restored, (), (1,), profiles={0.9: rich, 0.3: cheap})
  assert engine.ranks == (cheap, rich) and engine.label(rich) == "profile@0.9"
  between = (engine.flops(cheap) + engine.flops(rich)) / 2 / engine.flops(None)
  assert engine.resolve(None, between) == cheap and engine.resolve(None, 1.0) == rich
  with pytest.raises(RequestError, match="serves FlexRank profiles"):
    engine.resolve(4, None)
  assert engine.describe_point(rich)["profile"] == {"budget": 0.9, "ranks": "6–6 (mean 6.0)"}
  parsed = engine.parse({"inputs": [[7] * 784], "budget": 1.0}, 8)
  (result,), _ = engine.run(parsed.rank, 1, [parsed])
  described = Server(engine, ServeOptions(path=workdir)).describe()
  assert json.loads(json.dumps(described))["ranks"][1]["profile"]["budget"] == 0.9
  x = np.full((1, 784), 7 / 255, np.float32)
  expected = jax.nn.softmax(restored.model(x, rank=dict(rich)))
  np.testing.assert_allclose(result["probabilities"], expected, rtol=1e-5)


def test_executable_store_loads_what_it_stored_and_rebuilds_a_bad_entry(tmp_path, monkeypatch):
  import jax.numpy as jnp

  from nsn_jax.serve import executables

  x = jnp.arange(6.0).reshape(2, 3)
  lowered = []

  def lower():
    lowered.append(1)
    return jax.jit(lambda v: jnp.tanh(v) * 2).lower(x)

  events = []
  monkeypatch.setattr(executables, "log_event", lambda event, **_: events.append(event))
  counts = dict(executables.COUNTS)
  store = lambda step=5, model="model-a": executables.ExecutableStore(
    str(tmp_path), "ckpt", step, model
  )
  first = store().compile("f-batch2", lower)
  again = store().compile("f-batch2", lower)
  assert len(lowered) == 1  # the second store neither traced nor lowered
  np.testing.assert_array_equal(again(x), first(x))
  assert executables.COUNTS["loaded"] == counts.get("loaded", 0) + 1
  # Another step, or another model at the same path and step (retrained in place): compiled.
  store(step=6).compile("f-batch2", lower)
  store(model="model-b").compile("f-batch2", lower)
  assert len(lowered) == 3
  rebuilt = store()
  entry = rebuilt.directory / "f-batch2.bin"
  entry.write_bytes(b"truncated")
  np.testing.assert_array_equal(rebuilt.compile("f-batch2", lower)(x), first(x))
  assert len(lowered) == 4 and entry.read_bytes() != b"truncated"  # replaced by a good entry
  assert events == ["executable_unreadable"]


def test_a_restart_loads_programs_and_latencies_instead_of_rebuilding_them(workdir, tmp_path):
  from nsn_jax.serve import executables
  from nsn_jax.serve.app import load_engine

  options = ServeOptions(
    path=workdir, ranks="2,8", max_batch=4, batch_sizes=(1, 4), compilation_cache=str(tmp_path)
  ).validate()
  first = Server(load_engine(options), options)
  first.prepare()
  first.engine.store.save_latency(first.latency.to_json(first.engine.label))
  loaded = executables.COUNTS["loaded"]
  engine = load_engine(options)
  runs = []
  engine.run = lambda *args: runs.append(args)  # a restart measures nothing it knows
  again = Server(engine, options)
  again.prepare()
  assert executables.COUNTS["loaded"] == loaded + 4 and not runs
  assert again.latency.table(engine.label) == first.latency.table(first.engine.label)
  assert again.ready and json.dumps(again.describe())
