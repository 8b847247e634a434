"""Compile time of the eval sweep over every rank of the MLP, with and without JAX's persistent
compilation cache.

Each measurement is a fresh process (`python -m benchmarks.compile_time --worker ...`), so no
in-memory cache carries over: once with the cache off, then twice on one empty cache directory,
`cold` (compiles and writes) and `warm` (must read every rank's program back from disk; the
worker counts JAX's `/jax/compilation_cache/cache_hits` events to prove it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from flax import nnx
import jax
import jax.numpy as jnp

from benchmarks.common import Column, SuiteResult, eval_program, mlp_config, summary_line
from benchmarks.timing import Policy
from nsn_jax import flops
from nsn_jax.build import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
MODES = ("off", "cold", "warm")
CACHE_HIT = "/jax/compilation_cache/cache_hits"

COLUMNS = (
  Column("rank", "rank"),
  Column("lower_s", "lower ms", ".1f", 1e3),
  Column("compile_off_s", "no cache ms", ".1f", 1e3),
  Column("compile_cold_s", "cold ms", ".1f", 1e3),
  Column("compile_warm_s", "warm ms", ".1f", 1e3),
  Column("warm_hit", "disk hit"),
)


def run(size: str, policy: Policy) -> SuiteResult:
  del policy  # each compile happens once per process by construction
  with tempfile.TemporaryDirectory(prefix="nsn_jax_cache_") as cache_dir:
    runs = {mode: _worker(size, None if mode == "off" else cache_dir) for mode in MODES}
    cache_files = sum(len(files) for _, _, files in os.walk(cache_dir))
  rows = []
  for i, rank in enumerate(runs["off"]["ranks"]):
    rows.append(
      {
        "rank": rank,
        "lower_s": runs["off"]["lower_s"][i],
        **{f"compile_{mode}_s": runs[mode]["compile_s"][i] for mode in MODES},
        "warm_hit": runs["warm"]["hits"][i],
      }
    )
  totals = {mode: sum(runs[mode]["compile_s"]) for mode in MODES}
  summary = [
    summary_line(f"sweep over {len(rows)} ranks: total compile s, no cache", totals["off"]),
    summary_line("total compile s, cache cold (compile + write)", totals["cold"]),
    summary_line("total compile s, cache warm (read from disk)", totals["warm"]),
    summary_line("no-cache / warm-cache compile time", totals["off"] / totals["warm"]),
    summary_line(
      "fraction of rank programs read from disk in the warm run",
      sum(row["warm_hit"] for row in rows) / len(rows),
      judged=True,
      at_least=1.0,
    ),
  ]
  notes = [
    f"eval program: the MLP's static-rank forward at batch {runs['off']['batch']}; "
    f"{cache_files} files in the cache directory after the cold run; process start-up "
    "(jax import, backend) is excluded; lower_s is tracing + lowering, which the "
    "persistent cache does not skip"
  ]
  return SuiteResult(rows, summary, notes, COLUMNS)


def _worker(size: str, cache_dir: str | None) -> dict:
  command = [sys.executable, "-m", "benchmarks.compile_time", "--worker", "--size", size]
  if cache_dir:
    command += ["--cache_dir", cache_dir]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"compile worker failed ({' '.join(command)}):\n{done.stderr}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(size: str, cache_dir: str | None) -> dict:
  """In a fresh process: lower and compile the eval program of every rank 1..R, one by one.

  Configures the cache first: JAX decides whether to use it at the process's first compile.
  """
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program, however small or quick to compile: the tiny MLP's are both.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  else:
    jax.config.update("jax_enable_compilation_cache", False)
  hits = []
  jax.monitoring.register_event_listener(
    lambda event, **kwargs: hits.append(1) if event == CACHE_HIT else None
  )

  config = mlp_config(size)
  # Lowering needs shapes only; an abstract model also keeps init's many small eager programs
  # out of the process (and out of the cache).
  model = nnx.eval_shape(lambda: build_model(config, seed=0))
  forward, state = eval_program(model)
  batch = config.eval.batch_size
  images = jax.ShapeDtypeStruct((batch, *config.data.image_shape), jnp.float32)
  # One-time start-up (backend, the compiler's matmul emitter) stays out of rank 1's time.
  jax.jit(jnp.matmul).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).compile()
  result = {"batch": batch, "ranks": [], "lower_s": [], "compile_s": [], "hits": []}
  for rank in range(1, flops.max_rank(model) + 1):
    hits_before = len(hits)
    start = time.perf_counter()
    lowered = forward.lower(state, images, rank)
    lowered_at = time.perf_counter()
    lowered.compile()
    result["ranks"].append(rank)
    result["lower_s"].append(lowered_at - start)
    result["compile_s"].append(time.perf_counter() - lowered_at)
    result["hits"].append(len(hits) > hits_before)
  return result


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description="compile-time worker (benchmarks.run starts it)")
  parser.add_argument("--worker", action="store_true", required=True)
  parser.add_argument("--size", choices=("tiny", "full"), required=True)
  parser.add_argument("--cache_dir")
  args = parser.parse_args()
  print(json.dumps(_measure(args.size, args.cache_dir)))
