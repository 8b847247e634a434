"""Serve every rank of one checkpoint over HTTP: python -m nsn_jax.serve --workdir=DIR.

  python -m nsn_jax.serve --workdir=runs/demo                               # every batch at R
  python -m nsn_jax.serve --workdir=runs/demo --policy=slo --slo_ms=20      # degrade under load
  python -m nsn_jax.serve --workdir=runs/smollm2_lm --ranks=144,288,576 --max_batch=8

Loads the newest good checkpoint (or an export) once, then listens at once: /healthz answers,
/readyz turns 200 when every (rank, batch size) program is compiled — through JAX's persistent
compilation cache (--compilation_cache), so a restart loads instead of compiling. SIGTERM or
Ctrl-C stop taking connections, answer every request already queued, and exit 0. docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

from absl import flags
import jax

from nsn_jax import cli
from nsn_jax.serve.metrics import log_event
from nsn_jax.serve.options import POLICIES, ServeOptions

flags.DEFINE_string(
  "workdir",
  None,
  "A train.py workdir, its checkpoints/ folder or an export's --out.",
  required=True,
)
flags.DEFINE_integer("step", None, "A checkpoint step (default: the newest good one).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every one).")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_enum("policy", "fixed", POLICIES, "How a batch's rank is chosen.")
flags.DEFINE_bool(
  "profiles", False, "Serve the checkpoint's FlexRank profiles (budgets) instead of ranks."
)
flags.DEFINE_integer("rank", None, "The fixed policy's rank (default: R).")
flags.DEFINE_string(
  "ranks", "", "Ranks to compile and serve, eval.py's syntax (default: powers of two and R)."
)
flags.DEFINE_enum(
  "budget_reference",
  None,
  ["max_rank", "dense"],
  "What a request's budget is a fraction of (default: max_rank; dense with --profiles).",
)
flags.DEFINE_integer("max_batch", 32, "Most rows (examples, prompts) per batch.")
flags.DEFINE_list("batch_sizes", [], "Compiled batch sizes (default: 1, 4, 16, … and max_batch).")
flags.DEFINE_float("max_wait_ms", 5.0, "Longest a batch waits to fill, ms.")
flags.DEFINE_integer("max_queue", 1024, "Most rows waiting; more get 503.")
flags.DEFINE_float("slo_ms", None, "The slo policy's latency target, ms.")
flags.DEFINE_float("slo_percentile", 99.0, "Which latency percentile it bounds.")
cli.compilation_cache_flag(
  "Cache directory: JAX's compilation cache, the server's executables and latencies"
)
flags.DEFINE_integer("context", 512, "Generation: KV-cache slots per sequence.")
flags.DEFINE_integer("max_new_tokens", 256, "Generation: most new tokens a request gets.")
flags.DEFINE_float("drain_timeout_s", 30.0, "On SIGTERM, longest wait for requests, s.")


def _options() -> ServeOptions:
  """The flags as ServeOptions: each flag is named after its field (--workdir sets `path`)."""
  values = {
    f.name: flags.FLAGS[f.name].value
    for f in dataclasses.fields(ServeOptions)
    if f.name in flags.FLAGS
  }
  try:
    values["batch_sizes"] = tuple(int(s) for s in values["batch_sizes"])
  except ValueError:
    listed = ",".join(values["batch_sizes"])
    raise ValueError(f"--batch_sizes={listed}: valid: integers") from None
  return ServeOptions(path=flags.FLAGS.workdir, **values).validate()


def main():
  options = _options()
  try:  # the serve extra; `make setup` installs it
    import uvicorn

    from nsn_jax.serve.app import Server, create_app, load_engine
  except ImportError as e:
    raise ValueError(f"{e}: the server needs its extra, pip install -e '.[serve]'") from None
  start = time.perf_counter()
  # The device thread's Python between XLA calls waits for the GIL behind the event loop's JSON
  # parsing; the default 5 ms switch interval made a 2 ms batch take 10 ms under load.
  sys.setswitchinterval(5e-4)
  if options.compilation_cache:
    cli.use_compilation_cache(options.compilation_cache)
    # Every program: a server's small programs are exactly the ones worth not recompiling.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  engine = load_engine(options)
  log_event(
    "loaded",
    path=options.path,
    step=engine.step,
    kind=engine.kind,
    ranks=list(engine.ranks),
    load_s=round(time.perf_counter() - start, 3),
  )
  server = Server(engine, options, on_failure=lambda: os._exit(1))
  config = uvicorn.Config(
    create_app(server),
    host=options.host,
    port=options.port,
    log_level="warning",
    access_log=False,
    timeout_graceful_shutdown=options.drain_timeout_s,
  )
  # uvicorn re-raises the signal that stopped it once it has drained; a no-op handler makes
  # that a clean exit 0 (a stop asked for is not a failure).
  signal.signal(signal.SIGTERM, lambda *_: None)
  signal.signal(signal.SIGINT, lambda *_: None)
  uvicorn.Server(config).run()


if __name__ == "__main__":
  cli.run(main)
