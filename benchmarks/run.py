"""The benchmark suite's one entry point: a table per suite on stdout, one JSON file of it all.

  python -m benchmarks.run                                   # every suite, full size
  python -m benchmarks.run --suite layer,train --size tiny --out /tmp/bench.json

Suites: layer, model, train, compile, torch (see docs/benchmarks.md). The torch suite compares
with the layer, model and train rows of the same run, so it adds those suites when missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import shlex
import subprocess
import sys

import flax
import jax
import jaxlib

from benchmarks import compile_time, layer, model, torch_ref, train_step
from benchmarks.common import Column, SuiteResult, write_report
from benchmarks.timing import POLICIES

JAX_SUITES = {
  "layer": layer.run,
  "model": model.run,
  "train": train_step.run,
  "compile": compile_time.run,
}
ORDER = (*JAX_SUITES, "torch")


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.run",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--suite",
    default=",".join(ORDER),
    help=f"comma-separated subset of {','.join(ORDER)} (default: all)",
  )
  parser.add_argument(
    "--size",
    choices=tuple(POLICIES),
    default="full",
    help="full: the issue's shapes; tiny: seconds, for the smoke test",
  )
  parser.add_argument("--out", help="JSON file to write (default: runs/benchmarks/SIZE.json)")
  args = parser.parse_args(argv)
  args.suites = [name.strip() for name in args.suite.split(",") if name.strip()]
  unknown = sorted(set(args.suites) - set(ORDER))
  if unknown or not args.suites:
    parser.error(f"unknown suites {unknown}; choose from {','.join(ORDER)}.")
  return args


def environment(argv: list[str], module: str = "benchmarks.run") -> dict:
  """Where and how the numbers were taken; the command is `python -m <module> <argv>`."""
  device = jax.devices()[0]
  return {
    "device_kind": device.device_kind,
    "platform": device.platform,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "python": platform.python_version(),
    "cpu_model": cpu_model(),
    "cpu_count": os.cpu_count(),
    "cpus_usable": len(os.sched_getaffinity(0)),
    "load_average_1m": os.getloadavg()[0],  # > cpus_usable: someone else shares the CPUs
    "command": shlex.join(["python", "-m", module, *argv]),
    "git_commit": _git("rev-parse", "HEAD"),
    "git_dirty": bool(_git("status", "--porcelain")),
    # OMP_NUM_THREADS sets the PyTorch reference's threads (the worker inherits it).
    "env": {
      name: os.environ.get(name) for name in ("JAX_PLATFORMS", "XLA_FLAGS", "OMP_NUM_THREADS")
    },
    "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def _git(*args: str) -> str | None:
  done = subprocess.run(
    ["git", *args], cwd=pathlib.Path(__file__).parent, capture_output=True, text=True, check=False
  )
  return done.stdout.strip() if done.returncode == 0 else None


def format_table(rows: list[dict], columns: tuple[Column, ...]) -> str:
  """Fixed-width columns, right-aligned; None prints as '-'."""
  cells = [[_cell(row.get(column.key), column) for column in columns] for row in rows]
  widths = [
    max(len(column.header), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
  ]
  return "\n".join(
    "  ".join(text.rjust(width) for text, width in zip(line, widths))
    for line in [[column.header for column in columns], *cells]
  )


def _cell(value, column: Column) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  if isinstance(value, list):
    return ",".join(map(str, value))
  if isinstance(value, (int, float)) and column.fmt:
    return format(value * column.scale, column.fmt)
  return str(value)


def format_summary(result: SuiteResult) -> str:
  lines = []
  for line in result.summary:
    verdict = ""
    if line["target"]:
      judged = {True: "met", False: "MISSED", None: "not judged at this size/batch"}[line["met"]]
      verdict = f"   [target {line['target']}: {judged}]"
    lines.append(f"  {line['metric']}: {line['value']:.3f}{verdict}")
  return "\n".join(lines + [f"  note: {note}" for note in result.notes])


def main(argv: list[str] | None = None) -> dict:
  """Runs the chosen suites, prints their tables and returns (and writes) the JSON report."""
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  env = environment(argv)
  suites = set(args.suites)
  if "torch" in suites and torch_ref.available() and not suites >= set(torch_ref.NEEDS):
    print(f"torch compares with rows of the same run: adding {', '.join(torch_ref.NEEDS)}.")
    suites |= set(torch_ref.NEEDS)
  policy = POLICIES[args.size]
  print(
    f"device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, "
    f"flax {env['flax']}, {env['cpus_usable']} CPUs, load {env['load_average_1m']:.2f}"
  )

  results: dict[str, SuiteResult] = {}
  for name in (name for name in ORDER if name in suites):
    print(f"\n== {name} (size {args.size}) ==", flush=True)
    if name == "torch":
      results[name] = torch_ref.run(args.size, policy, results)
    else:
      results[name] = JAX_SUITES[name](args.size, policy)
    if not results[name].skipped:
      print(format_table(results[name].rows, results[name].columns))
    print(format_summary(results[name]), flush=True)

  report = {
    "environment": env,
    "size": args.size,
    "policy": dataclasses.asdict(policy),
    "suites": {name: result.to_json() for name, result in results.items()},
  }
  out = write_report(args.out or f"runs/benchmarks/{args.size}.json", report)
  print(f"\nwrote {out}")
  return report


if __name__ == "__main__":
  main()
