"""nsn_jax against a plain PyTorch reference of the same layer and MLP, same shapes and ranks.

PyTorch lives in its own venv (.venv-torch, requirements/torch-reference.txt, `make torch-venv`),
never the project's; benchmarks.torch_worker runs there as a subprocess and returns JSON.

Two comparisons:
- per-rank inference (`run`, the torch suite of benchmarks.run): PyTorch eager against the layer
  and model suites' rows from the same invocation;
- the multi-rank train step (`compare_train`, `python -m benchmarks.torch_ref`): the demo MLP on
  its own rank set, nsn_jax's default strategy, vmap_masked and loop_static against PyTorch eager
  and torch.compile, from the same parameters and batch (losses and gradients checked first).
  JAX (benchmarks.train_step) and PyTorch each run in a long-lived worker pinned to the same
  cores with the same thread count; the parent asks one at a time, so they alternate and never
  run concurrently, in rounds whose order rotates; ratios are taken within a round.

  python -m benchmarks.torch_ref --out docs/train-vs-torch-cpu.json      # full: minutes
  python -m benchmarks.torch_ref --size tiny --out /tmp/train-torch.json  # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import pathlib
import shlex
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import layer, model, train_step
from benchmarks.common import (
  REPO,
  Column,
  SuiteResult,
  mlp_config,
  run_json_worker,
  summary_line,
  time_jax,
  write_report,
)
from benchmarks.line_worker import LineWorker
from benchmarks.timing import POLICIES, Policy
from nsn_jax import config as config_lib
from nsn_jax import host_memory

PYTHON = REPO / ".venv-torch" / "bin" / "python"
SETUP = (
  "python3 -m venv .venv-torch && .venv-torch/bin/pip install -r requirements/torch-reference.txt"
)
NEEDS = ("layer", "model")  # the JAX suites whose rows the ratios use

COLUMNS = (
  Column("what", "what"),
  Column("batch", "batch"),
  Column("rank", "rank"),
  Column("jax_strategy", "jax step"),
  Column("torch_s", "torch ms", ".3f", 1e3),
  Column("jax_s", "jax ms", ".3f", 1e3),
  Column("torch_over_jax", "torch/jax", ".2f"),
)


def available() -> bool:
  return PYTHON.exists()


def missing_message(what: str = "torch suite") -> str:
  return f"{what} skipped: no PyTorch venv at {PYTHON}. Create it from the repo root:\n  {SETUP}"


def matmul_ranks(max_rank: int) -> list[int]:
  """The ranks whose first-layer matmul both sides also time alone: R/4 and up, where the MLP's
  per-rank inference was slowest against PyTorch."""
  return [r for r in model.rank_grid(max_rank) if r >= max_rank // 4]


def _jax_matmul_rows(mlp_spec: dict, policy: Policy) -> list[dict]:
  """The MLP's first factor matmul x (batch, d_in) @ a_r (d_in, r) alone, jitted, on contiguous
  operands: what XLA's CPU dot achieves on the shape PyTorch hands to its BLAS."""
  matmul = jax.jit(jnp.matmul)
  rng = np.random.default_rng(2)
  rows = []
  for batch in mlp_spec["batches"]:
    x = jax.device_put(rng.random((batch, mlp_spec["input_dim"]), np.float32))
    for rank in mlp_spec["matmul_ranks"]:
      a = jax.device_put(rng.standard_normal((mlp_spec["input_dim"], rank), np.float32))
      rows.append(
        {"batch": batch, "rank": rank, "latency_s": time_jax(matmul, x, a, policy=policy).median_s}
      )
  return rows


def spec(size: str, policy: Policy) -> dict:
  """What the worker measures: the JAX suites' grids, so both sides time the same shapes."""
  grid = layer.GRIDS[size]
  config = mlp_config(size)
  max_rank = config.model.max_rank
  return {
    "policy": dataclasses.asdict(policy),
    "layer": {
      "d": grid.d,
      "max_rank": grid.max_rank,
      "ranks": list(grid.ranks),
      "batches": list(grid.batches),
    },
    "mlp": {
      "input_dim": math.prod(config.data.image_shape),
      "hidden": list(config.model.hidden),
      "num_classes": config.data.num_classes,
      "max_rank": max_rank,
      "image_shape": list(config.data.image_shape),
      "ranks": list(model.rank_grid(max_rank)),
      "batches": list(model.BATCHES[size]),
      "matmul_ranks": matmul_ranks(max_rank),
    },
  }


def _jax_latency(jax_results: dict[str, SuiteResult], matmul_rows: list[dict]) -> dict:
  """{(what, jax step, batch, rank): latency} of the JAX rows the inference rows compare with."""
  model_rows = [row for row in jax_results["model"].rows if row["model"] == "mlp"]
  return (
    {
      ("layer", "static", row["batch"], row["rank"]): row["latency_s"]
      for row in jax_results["layer"].rows
      if row["kind"] == "nsn"
    }
    | {
      ("mlp", "static", row["batch"], row["rank"]): row["latency_s"]
      for row in model_rows
      if row["kind"] == "nsn"
    }
    | {
      # The matmul policy deploys the MLP in the factorised form at every rank: the reference's
      # computation, on weights sliced once instead of per call.
      ("mlp", "deployed matmul", row["batch"], row["rank"]): row["latency_s"]
      for row in model_rows
      if row["kind"] == "deployed" and row["policy"] == "matmul"
    }
    | {
      ("mlp_matmul", "x @ a_r", row["batch"], row["rank"]): row["latency_s"] for row in matmul_rows
    }
  )


def run(size: str, policy: Policy, jax_results: dict[str, SuiteResult]) -> SuiteResult:
  if not available():
    return SuiteResult([], [], [missing_message()], COLUMNS, skipped=True)
  config = spec(size, policy)
  reference = run_json_worker(
    [str(PYTHON), "-m", "benchmarks.torch_worker"], input_text=json.dumps(config)
  )
  jax_latency = _jax_latency(jax_results, _jax_matmul_rows(config["mlp"], policy))
  rows = [
    {
      "what": row["what"],
      "batch": row["batch"],
      "rank": row["rank"],
      "jax_strategy": how,
      "torch_s": row["latency_s"],
      "jax_s": jax_s,
      "torch_over_jax": row["latency_s"] / jax_s,
    }
    for row in reference["rows"]
    for (what, how, batch, rank), jax_s in jax_latency.items()
    if (what, batch, rank) == (row["what"], row["batch"], row["rank"])
  ]

  def slowest(what, strategy=None):
    return min(
      row["torch_over_jax"]
      for row in rows
      if row["what"] == what and strategy in (None, row["jax_strategy"])
    )

  judged = size == "full"
  summary = [
    summary_line(
      "MLP per-rank inference, torch / jax (static slices), worst rank and batch",
      slowest("mlp", "static"),
      judged=judged,
      at_least=1.0,
    ),
    summary_line(
      "MLP per-rank inference, torch / jax (deployed, matmul policy), worst rank and batch",
      slowest("mlp", "deployed matmul"),
      judged=judged,
      at_least=1.0,
    ),
    summary_line(
      "MLP first-layer matmul x @ a_r alone, torch / jax, worst rank and batch",
      slowest("mlp_matmul"),
    ),
    summary_line(
      "NSN layer per-rank inference, torch / jax, worst rank and batch", slowest("layer")
    ),
  ]
  notes = [
    f"torch {reference['torch_version']} eager, {reference['torch_threads']} threads; "
    "torch/jax > 1 means nsn_jax is faster",
    "the multi-rank train step against PyTorch eager and torch.compile, pinned and interleaved: "
    "python -m benchmarks.torch_ref",
  ]
  return SuiteResult(rows, summary, notes, COLUMNS)


# The multi-rank train step against PyTorch eager and torch.compile (`compare_train`).
THREADS = (1, 2)  # cores and threads per side, one configuration after the other
ROUNDS = 5
ROUND_POLICIES = {"tiny": POLICIES["tiny"], "full": Policy(warmup=2, repeats=5, min_sample_s=0.05)}
TOLERANCE = 1e-5  # the largest relative difference of losses and gradients the check allows
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# Issue 17's targets, against PyTorch as it runs by default and with the malloc settings the
# JAX side runs with (train.py's --keep_host_memory, given to glibc through its environment).
TORCH_SIDES = ("torch", "torch_malloc")
TARGETS = tuple(
  (f"{side}:{variant}", batch, goal)
  for variant, batch, goal in (
    ("compile", "largest", 1.0),
    ("compile_shared", "largest", 1.0),
    ("eager", "smallest", 1.5),
  )
  for side in TORCH_SIDES
)

CONTENDER_COLUMNS = (
  Column("threads", "threads"),
  Column("batch", "batch"),
  Column("name", "contender"),
  Column("buckets", "buckets"),
  Column("step_s", "ms/step", ".3f", 1e3),
  Column("step_min_s", "min ms", ".3f", 1e3),
  Column("program_temp_bytes", "temp MiB", ".2f", 2.0**-20),
  Column("loss_rel_diff", "loss diff", ".1e"),
  Column("grad_rel_diff", "grad diff", ".1e"),
)
RATIO_COLUMNS = (
  Column("threads", "threads"),
  Column("batch", "batch"),
  Column("ratio", "ratio of step times (> 1: the second is faster)"),
  Column("median", "median", ".3f"),
  Column("min", "min", ".3f"),
  Column("max", "max", ".3f"),
)


def train_spec(size: str) -> dict:
  """What both workers build: the demo MLP (`mlp_config(size)`) on its own rank set, the
  batches, AdamW's peak learning rate and weight decay."""
  config = mlp_config(size)
  return {
    "input_dim": math.prod(config.data.image_shape),
    "hidden": list(config.model.hidden),
    "num_classes": config.data.num_classes,
    "max_rank": config.model.max_rank,
    "ranks": list(config_lib.fixed_ranks(config)),
    "batches": list(train_step.DEMO_BATCHES[size]),
    "learning_rate": config.optimizer.learning_rate,
    "weight_decay": config.optimizer.weight_decay,
  }


def worker_commands(threads: int, with_torch: bool) -> dict[str, tuple[list[str], dict]]:
  """{side: (command, environment added)}: both pinned by taskset to the same first `threads`
  usable CPUs; XLA single-threaded at 1 thread (its default pool otherwise), PyTorch's OpenMP
  and MKL at `threads` threads (the worker also calls torch.set_num_threads)."""
  pin = ["taskset", "-c", ",".join(map(str, sorted(os.sched_getaffinity(0))[:threads]))]
  commands = {
    "jax": (
      [*pin, sys.executable, "-m", "benchmarks.train_step"],
      {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ONE_THREAD_XLA if threads == 1 else ""},
    )
  }
  if with_torch:
    torch_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [*pin, str(PYTHON), "-m", "benchmarks.torch_worker", "--serve"]
    commands["torch"] = (command, torch_env)
    commands["torch_malloc"] = (command, {**torch_env, **host_memory.ENVIRONMENT})
  return commands


def check_agreement(contenders: list[dict], directory: pathlib.Path) -> list[dict]:
  """Each contender's loss and gradients at the initial parameters (on the check batch,
  `train_step.check_batch`) against the JAX default's at the same batch: the loss's relative
  difference and the worst parameter's ‖Δg‖ / ‖g‖. RuntimeError when either exceeds TOLERANCE:
  the timings would compare different maths."""
  checks = []
  for contender in contenders:
    reference = next(c for c in contenders if c.get("default") and c["batch"] == contender["batch"])
    load = lambda c: np.load(directory / f"grads_{c['name']}_{c['batch']}.npz")
    grads, expected = load(contender), load(reference)
    if sorted(grads.files) != sorted(expected.files):
      raise RuntimeError(f"{contender['name']} has gradients {grads.files}, not {expected.files}")
    diffs = {
      key: float(np.linalg.norm(grads[key] - expected[key]) / np.linalg.norm(expected[key]))
      for key in expected.files
    }
    worst = max(diffs, key=diffs.get)
    checks.append(
      {
        "loss_rel_diff": abs(contender["loss"] - reference["loss"]) / abs(reference["loss"]),
        "grad_rel_diff": diffs[worst],
        "worst_gradient": worst,
      }
    )
  failed = [
    (c["name"], c["batch"], check)
    for c, check in zip(contenders, checks)
    if max(check["loss_rel_diff"], check["grad_rel_diff"]) > TOLERANCE
  ]
  if failed:
    raise RuntimeError(
      f"losses or gradients differ from the JAX default's by > {TOLERANCE}: {failed}"
    )
  return checks


def timed_rounds(workers: dict, names: list[str], batches, rounds: int, policy: Policy) -> list:
  """`rounds` rounds, each timing every contender at every batch, one worker at a time (the
  other waits on its stdin), the order rotated by one each round."""
  rows = []
  for round_ in range(rounds):
    turn = names[round_ % len(names) :] + names[: round_ % len(names)]
    for batch in batches:
      for position, name in enumerate(turn):
        reply = workers[name.split(":")[0]].request(
          "time", name=name, batch=batch, policy=dataclasses.asdict(policy)
        )
        rows.append({"round": round_, "batch": batch, "position": position, "name": name, **reply})
  return rows


def run_config(size: str, threads: int, rounds: int, with_torch: bool) -> dict:
  """Starts both workers on `threads` cores, builds and checks every contender, times the
  rounds; the configuration's record (commands, loads, worker reports, check, timings)."""
  commands, spec = worker_commands(threads, with_torch), train_spec(size)
  record = {"threads": threads, "taskset_cpus": commands["jax"][0][2]}
  record["loadavg_before"], start = os.getloadavg(), time.perf_counter()
  with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
    workers = {
      side: stack.enter_context(LineWorker(command, cwd=REPO, env=env))
      for side, (command, env) in commands.items()
    }
    ready = {
      "jax": workers["jax"].request("setup", size=size, batches=spec["batches"], directory=scratch)
    }
    for side in TORCH_SIDES if with_torch else ():
      ready[side] = workers[side].request(
        "setup", spec=spec, threads=threads, directory=scratch, side=side
      )
    contenders = [c for side in ready.values() for c in side.pop("contenders")]
    checks = check_agreement(contenders, pathlib.Path(scratch))
    names = [c["name"] for c in contenders if c["batch"] == spec["batches"][0]]
    sides = [[n for n in names if n.startswith(f"{side}:")] for side in ("jax", *TORCH_SIDES)]
    alternating = [n for pair in itertools.zip_longest(*sides) for n in pair if n]
    record["setup_s"], start = time.perf_counter() - start, time.perf_counter()
    record["timings"] = timed_rounds(
      workers, alternating, spec["batches"], rounds, ROUND_POLICIES[size]
    )
  record["rounds_s"], record["loadavg_after"] = time.perf_counter() - start, os.getloadavg()
  record["workers"] = {
    side: {"command": shlex.join(command), "env": env, **ready[side]}
    for side, (command, env) in commands.items()
  }
  record["contenders"] = [{**c, **check} for c, check in zip(contenders, checks)]
  return record


def contender_rows(record: dict) -> list[dict]:
  """Per contender of a configuration: the median over rounds of its per-round medians, the
  fastest sample of all, its memory (JAX) and its check."""
  rows = []
  for contender in record["contenders"]:
    key = (contender["name"], contender["batch"])
    mine = [t for t in record["timings"] if (t["name"], t["batch"]) == key]
    rows.append(
      {
        "threads": record["threads"],
        **contender,
        "step_s": statistics.median(t["median_s"] for t in mine),
        "step_min_s": min(t["min_s"] for t in mine),
      }
    )
  return rows


def ratio_rows(record: dict) -> list[dict]:
  """Per batch, each PyTorch variant's step time over each JAX strategy's, and each other JAX
  strategy's over the default's, computed round by round from that round's timings."""
  times = {(t["round"], t["batch"], t["name"]): t["median_s"] for t in record["timings"]}
  rounds = sorted({t["round"] for t in record["timings"]})
  default = next(c["name"] for c in record["contenders"] if c.get("default"))
  names = list(dict.fromkeys(t["name"] for t in record["timings"]))
  jax_names = [n for n in names if n.startswith("jax:")]
  pairs = [(a, b) for a in names if a.startswith("torch") for b in jax_names]
  pairs += [(b, default) for b in jax_names if b != default]
  rows = []
  for batch in dict.fromkeys(t["batch"] for t in record["timings"]):
    for a, b in pairs:
      per_round = [times[r, batch, a] / times[r, batch, b] for r in rounds]
      rows.append(
        {
          "threads": record["threads"],
          "batch": batch,
          "ratio": f"{a} / {b}",
          "median": statistics.median(per_round),
          "min": min(per_round),
          "max": max(per_round),
          "per_round": per_round,
        }
      )
  return rows


def train_summary(records: list[dict], ratios: list[dict], size: str) -> list[dict]:
  """The issue's targets: the default step against torch.compile at the largest batch and
  against eager at the smallest (per thread setting; the median of the per-round ratios, with
  their range), its temporaries against loop_static's per batch, and the check."""
  judged = size == "full"
  contenders = records[0]["contenders"]
  default = next(c["name"] for c in contenders if c.get("default"))
  batches = sorted({c["batch"] for c in contenders})
  lines = []
  for record in records:
    for torch_name, which, goal in TARGETS:
      batch = batches[-1] if which == "largest" else batches[0]
      wanted = (record["threads"], batch, f"{torch_name} / {default}")
      for row in (r for r in ratios if (r["threads"], r["batch"], r["ratio"]) == wanted):
        metric = f"{record['threads']} thread(s), batch {batch}: {torch_name} / {default} (default)"
        line = summary_line(f"{metric} step time", row["median"], at_least=goal, judged=judged)
        lines.append({**line, "min": row["min"], "max": row["max"]})
  for batch in batches:
    temp = {c["name"]: c.get("program_temp_bytes") for c in contenders if c["batch"] == batch}
    lines.append(
      summary_line(
        f"batch {batch}: temporaries of {default} (default) / jax:loop_static",
        temp[default] / temp["jax:loop_static"],
        at_most=1.3,
        judged=judged,
      )
    )
  worst = max(max(c["loss_rel_diff"], c["grad_rel_diff"]) for r in records for c in r["contenders"])
  check = "largest relative difference of a loss or gradient to the JAX default's"
  return lines + [summary_line(check, worst, at_most=TOLERANCE, judged=True)]


def compare_train(size: str, rounds: int, threads: tuple[int, ...]) -> dict:
  """The comparison at each thread setting in turn: the report's configurations, tables,
  summary and notes. Without the PyTorch venv the JAX side still runs; PyTorch is skipped."""
  with_torch = available()
  records = [run_config(size, n, rounds, with_torch) for n in threads]
  ratios = [row for record in records for row in ratio_rows(record)]
  notes = [
    "ratio A / B: A's step time over B's within one round (> 1: B is faster); median, min and "
    f"max over {rounds} rounds; a contender's ms/step: the median of its per-round medians",
    "jax: the library's step (build_method per train.multi_rank, config_train_step), state "
    "donated, the config's AdamW with its warm-up/cosine schedule; per-rank metrics included",
    "torch: AdamW at the config's peak learning rate, constant; torch.compile (inductor, default "
    "mode, dynamic=False) compiles the loss (forward + backward) and optimizer.step; "
    "compile_shared: the same with the first layer run once for every rank (prefix sums over "
    "rank segments, as nsn_jax.rank_sharing does)",
    "torch_malloc: the same PyTorch worker with glibc's malloc set as the JAX worker's "
    "(nsn_jax.host_memory, given as MALLOC_* environment variables): freed memory reused, "
    "not returned to the OS; torch: glibc's defaults",
    "check: loss and gradients at the initial parameters, each contender against the JAX "
    "default, on the timed batch with each example whose float64 pre-activations come within "
    f"{train_step.KINK_MARGIN:g} of a ReLU kink replaced by another (workers.jax."
    "check_rows_replaced): there float32 rounding picks the side of the kink",
  ]
  if not with_torch:
    notes.append(missing_message("the PyTorch side"))
  return {
    "size": size,
    "policy": dataclasses.asdict(ROUND_POLICIES[size]),
    "rounds": rounds,
    "torch": {"skipped": not with_torch, "python": str(PYTHON), "setup": SETUP},
    "configs": records,
    "contenders": [row for record in records for row in contender_rows(record)],
    "ratios": ratios,
    "summary": train_summary(records, ratios, size),
    "notes": notes,
  }


def format_train_summary(lines: list[dict]) -> str:
  """One line per summary entry: the value, the range over rounds, the target and verdict."""
  out = []
  for line in lines:
    spread = f" (rounds {line['min']:.3f}-{line['max']:.3f})" if "min" in line else ""
    verdict = {True: "met", False: "MISSED", None: "not judged at this size"}[line["met"]]
    out.append(f"  {line['metric']}: {line['value']:.3g}{spread}   [{line['target']}: {verdict}]")
  return "\n".join(out)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.torch_ref",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--size", choices=tuple(ROUND_POLICIES), default="full")
  parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved rounds")
  parser.add_argument(
    "--threads", default=",".join(map(str, THREADS)), help="thread settings, e.g. 1,2"
  )
  parser.add_argument("--out", help="JSON file (default: runs/benchmarks/train-vs-torch-SIZE.json)")
  args = parser.parse_args(argv)
  args.threads = tuple(int(n) for n in args.threads.split(","))
  if args.rounds < 1 or max(args.threads) > len(os.sched_getaffinity(0)) or min(args.threads) < 1:
    parser.error(f"need rounds >= 1 and 1 <= threads <= {len(os.sched_getaffinity(0))} CPUs.")
  return args


def main(argv: list[str] | None = None) -> dict:
  """The train-step comparison: tables and summary on stdout, the report as JSON."""
  from benchmarks import run as bench_run  # it imports this module

  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  environment = bench_run.environment(argv, "benchmarks.torch_ref")
  environment["loadavg_start"] = os.getloadavg()
  report = {"environment": environment, **compare_train(args.size, args.rounds, args.threads)}
  environment["loadavg_end"] = os.getloadavg()
  torch_worker = report["configs"][0]["workers"].get("torch", {})
  environment["torch"] = torch_worker.get("torch")
  print(bench_run.format_table(report["contenders"], CONTENDER_COLUMNS))
  print()
  print(bench_run.format_table(report["ratios"], RATIO_COLUMNS))
  print(format_train_summary(report["summary"]))
  print("\n".join(f"  note: {note}" for note in report["notes"]))
  out = write_report(args.out or f"runs/benchmarks/train-vs-torch-{args.size}.json", report)
  print(f"\nwrote {out}")
  return report


if __name__ == "__main__":
  main()
