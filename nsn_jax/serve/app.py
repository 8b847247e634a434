"""The HTTP API: a Starlette app over one engine, its batcher, rank policy and metrics.

  POST /v1/classify   {"inputs" | "texts", "rank"?, "budget"?}  → labels, probabilities, rank, FLOPs
  POST /v1/generate   {"prompt", "max_new_tokens"?, sampling, "stop"?, "rank"?, "budget"?} → text
  GET  /v1/model      what is served: kind, ranks and their FLOPs, policy, measured latencies
  GET  /healthz       200 while the process serves HTTP
  GET  /readyz        200 once every program is compiled and measured, else 503
  GET  /metrics       Prometheus text format

Every refusal is JSON {"error": one line} with a 4xx status (503 + Retry-After when overloaded or
not yet ready); a request never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nsn_jax import flops
from nsn_jax.layers import nsn_layers
from nsn_jax.profiles import saved_profiles
from nsn_jax.restore import checkpoint_directory, restore_model
from nsn_jax.serve import executables
from nsn_jax.serve.batcher import Batcher, BatchInfo, Overloaded
from nsn_jax.serve.classify import Classifier
from nsn_jax.serve.engine import Engine, RequestError
from nsn_jax.serve.generate import Generator
from nsn_jax.serve.metrics import ServerMetrics, cache_counts, log_event
from nsn_jax.serve.options import ServeOptions
from nsn_jax.serve.policy import FixedPolicy, LatencyModel, SloPolicy

MAX_BODY_BYTES = 64 << 20
WARM_UP_RUNS = 3  # per program at start-up: the latency model's first samples


def _error(status: int, message: str, retry_after_s: float | None = None) -> JSONResponse:
  headers = {} if retry_after_s is None else {"Retry-After": str(max(1, math.ceil(retry_after_s)))}
  return JSONResponse({"error": message}, status_code=status, headers=headers)


class Server:
  """One engine served: start-up (compile, measure), then admission and responses."""

  def __init__(self, engine: Engine, options: ServeOptions, on_failure=lambda: None):
    self.engine, self.options, self.on_failure = engine, options, on_failure
    self.failed: str | None = None
    self.metrics = ServerMetrics()
    self.latency = LatencyModel(options.slo_percentile)
    fixed_rank = options.rank or engine.ranks[-1]  # default: the most expensive point
    self.policy = (
      SloPolicy(engine.ranks, self.latency, options.slo_ms / 1e3, options.max_batch, engine.bucket)
      if options.policy == "slo"
      else FixedPolicy(fixed_rank)
    )
    self.batcher: Batcher | None = None
    self.ready = False
    self.progress = (0, len(engine.programs()))
    self.startup: dict[str, float] = {}

  def prepare(self) -> None:
    """Compiles every program (persistent cache permitting, loads it), measures each, then
    marks the server ready. Runs on a thread so /healthz and /readyz answer meanwhile. A
    failure is logged, kept for /readyz, and handed to `on_failure` (the CLI exits 1: a
    server that cannot run its model must not linger)."""
    try:
      self._prepare()
    except Exception as e:
      self.failed = f"{type(e).__name__}: {e}"
      log_event("failed", error=self.failed)
      self.on_failure()

  def _prepare(self) -> None:
    start = time.perf_counter()
    programs = self.engine.programs()
    for i, (rank, size) in enumerate(programs):
      self.engine.compile(rank, size)
      self.progress = (i + 1, len(programs))
    compiled = time.perf_counter()
    store = self.engine.store
    if store is not None:  # the last run's latencies here: only unmeasured programs are timed
      labels = {self.engine.label(p): p for p in self.engine.ranks}
      self.latency.seed(store.load_latency(), labels)
    for rank, size in (p for p in programs if not self.latency.has(*p)):
      requests = self.engine.warm_up_request(size)
      for _ in range(WARM_UP_RUNS):
        t0 = time.perf_counter()
        _, units = self.engine.run(rank, size, requests)
        self.latency.observe(rank, size, (time.perf_counter() - t0) / units)
    self.startup = {
      "compile_s": compiled - start,
      "measure_s": time.perf_counter() - compiled,
      **cache_counts(),
      "executables_loaded": executables.COUNTS["loaded"],
      "executables_compiled": executables.COUNTS["compiled"],
    }
    self.ready = True
    self.metrics.ready.set(1)
    log_event("ready", programs=len(programs), **self.startup)

  def describe(self) -> dict:
    """GET /v1/model."""
    e = self.engine
    return {
      "kind": e.kind,
      "task": e.config.task,
      "step": e.step,
      "max_rank": e.max_rank,
      "ranks": [e.describe_point(point) for point in e.ranks],
      "batch_sizes": list(e.batch_sizes),
      "policy": self.policy.name,
      "fixed": e.label(self.policy.rank) if self.policy.name == "fixed" else None,
      "slo_ms": self.options.slo_ms,
      "budget_reference": e.budget_reference,
      "latency_ms_per_unit": self.latency.table(e.label),
      "ready": self.ready,
      "startup": self.startup,
    }

  async def infer(self, request: Request) -> Response:
    """POST /v1/classify or /v1/generate."""
    endpoint = request.url.path.rsplit("/", 1)[-1]
    arrival = time.monotonic()
    response, rank = await self._answer(request, endpoint, arrival)
    label = self.engine.label(rank)
    self.metrics.requests.labels(endpoint, label, str(response.status_code)).inc()
    if response.status_code == 200:
      self.metrics.latency.labels(endpoint, label).observe(time.monotonic() - arrival)
    self.metrics.queue_rows.set(self.batcher.queued_rows)
    return response

  async def _answer(
    self, request: Request, endpoint: str, arrival: float
  ) -> tuple[Response, int | None]:
    if endpoint != self.engine.kind:
      return _error(
        404, f"this server holds a {self.engine.kind} model: POST /v1/{self.engine.kind}"
      ), None
    if not self.ready:
      done, total = self.progress
      return _error(503, f"not ready: compiling ({done} of {total} programs)", 5), None
    full = self.batcher.full()  # refused before its body is read: overload costs little
    if full is not None:
      return _error(503, f"overloaded: {full}", full.retry_after_s), None
    try:
      parsed = self._parse(await _json_body(request))
      done = self.batcher.submit(parsed, arrival)
    except RequestError as e:
      return _error(e.status, str(e)), None
    except Overloaded as e:
      log_event("refused", reason=str(e), retry_after_s=round(e.retry_after_s, 3))
      return _error(503, f"overloaded: {e}", e.retry_after_s), None
    self.metrics.queue_rows.set(self.batcher.queued_rows)
    try:
      result, info = await done
    except Exception as e:  # a failed batch: this request fails, the server stays up
      log_event("batch_failed", error=f"{type(e).__name__}: {e}")
      return _error(500, f"inference failed: {type(e).__name__}: {e}"), None
    return JSONResponse({**result, **self._costs(info, parsed.budget)}), info.rank

  def _parse(self, body):
    """The engine's check of a body; a value it did not foresee (a lone surrogate the tokenizer
    refuses, a number too large for a float) is still the request's fault: 422."""
    try:
      return self.engine.parse(body, self.options.max_batch)
    except RequestError:
      raise
    except Exception as e:
      raise RequestError(422, f"body: unusable ({type(e).__name__}: {e})") from None

  def _costs(self, info: BatchInfo, budget: float | None) -> dict:
    return {
      **self.engine.describe_point(info.rank),
      "budget": budget,
      "chosen_by": info.chosen_by,
      "batch_size": info.batch_size,
      "queue_ms": 1e3 * info.queue_s,
      "compute_ms": 1e3 * info.compute_s,
    }

  def _loop_ended(self, task: asyncio.Task) -> None:
    """The batching loop only ends on stop(); if it died, say so at /readyz and stop serving."""
    if not task.cancelled() and task.exception() is not None:
      self.failed = f"batching loop: {type(task.exception()).__name__}: {task.exception()}"
      self.ready = False
      log_event("failed", error=self.failed)
      self.on_failure()

  def on_batch(self, info: BatchInfo, rows: int) -> None:
    self.metrics.batch_rows.observe(rows)
    self.metrics.batches.labels(self.engine.label(info.rank), info.chosen_by).inc()
    log_event(
      "batch",
      rank=self.engine.label(info.rank),
      rows=rows,
      batch_size=info.batch_size,
      chosen_by=info.chosen_by,
      compute_ms=round(1e3 * info.compute_s, 3),
      queued_rows=self.batcher.queued_rows,
    )

  @contextlib.asynccontextmanager
  async def lifespan(self, app: Starlette):
    """Starts the batching loop and the compile thread; on shutdown (after uvicorn has let
    in-flight requests finish) serves what is still queued, then stops."""
    o = self.options
    self.batcher = Batcher(
      self.engine,
      self.policy,
      self.latency,
      o.max_batch,
      o.max_wait_ms / 1e3,
      o.max_queue,
      self.on_batch,
    )
    loop_task = asyncio.create_task(self.batcher.run())
    loop_task.add_done_callback(self._loop_ended)
    threading.Thread(target=self.prepare, name="compile", daemon=True).start()
    yield
    self.batcher.stop()
    await loop_task
    if self.engine.store is not None and self.ready:  # what a restart seeds itself from
      self.engine.store.save_latency(self.latency.to_json(self.engine.label))
    log_event("stopped")


async def _json_body(request: Request):
  """The request's JSON; RequestError 413 over MAX_BODY_BYTES, 400 when it is not JSON."""
  length = request.headers.get("content-length")
  if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
    raise RequestError(413, f"body of {length} bytes: valid: at most {MAX_BODY_BYTES}")
  body = bytearray()
  async for chunk in request.stream():
    body += chunk
    if len(body) > MAX_BODY_BYTES:
      raise RequestError(413, f"body over {MAX_BODY_BYTES} bytes")
  try:
    return json.loads(body)
  except (ValueError, UnicodeDecodeError, RecursionError) as e:
    raise RequestError(400, f"body is not valid JSON: {type(e).__name__}: {e}") from None


def create_app(server: Server) -> Starlette:
  """The ASGI app of `server`."""

  async def model(request: Request) -> Response:
    return JSONResponse(server.describe())

  async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})

  async def readyz(request: Request) -> Response:
    if server.ready:
      return JSONResponse({"ready": True})
    if server.failed:
      return JSONResponse({"ready": False, "error": server.failed}, status_code=503)
    done, total = server.progress
    return JSONResponse({"ready": False, "compiled": done, "programs": total}, status_code=503)

  async def metrics(request: Request) -> Response:
    return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

  async def http_error(request: Request, exc: HTTPException) -> Response:
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

  routes = [
    Route("/v1/classify", server.infer, methods=["POST"]),
    Route("/v1/generate", server.infer, methods=["POST"]),
    Route("/v1/model", model),
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
  ]
  return Starlette(
    routes=routes, lifespan=server.lifespan, exception_handlers={HTTPException: http_error}
  )


def load_engine(options: ServeOptions) -> Engine:
  """The engine for `options.path`'s checkpoint (a ServeOptions): restored, ranks checked."""
  restored = restore_model(options.path, step=options.step)
  model = restored.model
  ranks = options.ladder(flops.max_rank(model) if nsn_layers(model) else None)
  profiles = saved_profiles(restored.metadata) if options.profiles else None
  store = None
  if options.compilation_cache:
    identity = json.dumps(restored.metadata, sort_keys=True, default=str)
    checkpoint = checkpoint_directory(options.path)
    store = executables.ExecutableStore(
      options.compilation_cache, checkpoint, restored.step, identity
    )
  common = dict(budget_reference=options.reference(), profiles=profiles, store=store)
  sizes = options.compiled_batch_sizes()
  if restored.config.task == "language_modelling":
    return Generator(
      restored,
      ranks,
      sizes,
      context=options.context,
      max_new_tokens=options.max_new_tokens,
      **common,
    )
  return Classifier(restored, ranks, sizes, **common)
