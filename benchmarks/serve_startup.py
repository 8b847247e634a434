"""A generation server's cold and warm start, and its latency per rank: what the persistent
compilation cache saves where compiling dominates (a language model's prefill and decode
programs for every rank, batch size and prompt bucket).

  python -m benchmarks.serve_startup --workdir runs/smollm2_serve --ranks 133,288,576 \\
      --out docs/serving-startup.json
  (runs/smollm2_serve: python train.py --config=configs/smollm2_lm.py ... ; docs/serving.md)

Starts `python -m nsn_jax.serve` on the workdir twice, on one empty --compilation_cache and
XDG cache (cold, then warm), then asks the warm server for one greedy generation per rank, a
few times each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

from benchmarks.common import Column, write_report
from benchmarks.serve_load import environment, serving, startup_record

COLUMNS = (
  Column("start", "start"),
  Column("launch_to_ready_s", "launch→ready s", ".2f"),
  Column("load_s", "load s", ".2f"),
  Column("compile_s", "compile s", ".2f"),
  Column("measure_s", "measure s", ".2f"),
  Column("hits", "cache hits"),
  Column("misses", "misses"),
)


def _generate(port: int, body: dict) -> tuple[float, dict]:
  connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  try:
    start = time.perf_counter()
    connection.request("POST", "/v1/generate", json.dumps(body))
    reply = json.loads(connection.getresponse().read())
    return time.perf_counter() - start, reply
  finally:
    connection.close()


def latency_rows(port: int, ranks: list[int], prompt: str, new: int, repeats: int) -> list[dict]:
  """Median seconds of one greedy generation of `new` tokens at each rank (one request alone)."""
  rows = []
  for rank in ranks:
    body = {"prompt": prompt, "max_new_tokens": new, "rank": rank}
    runs = [_generate(port, body) for _ in range(repeats)]
    seconds = statistics.median(s for s, _ in runs)
    reply = runs[-1][1]
    rows.append(
      {
        "rank": rank,
        "median_s": seconds,
        "tokens": len(reply["tokens"]),
        "tokens_per_s": len(reply["tokens"]) / seconds,
        "flops_frac_dense": reply["flops_frac_dense"],
        "text": reply["text"],
      }
    )
  return rows


def measure(args: argparse.Namespace, tmp: pathlib.Path) -> dict:
  flags = [
    f"--ranks={args.ranks}",
    f"--max_batch={args.max_batch}",
    f"--batch_sizes={args.max_batch}",
    f"--context={args.context}",
    f"--max_new_tokens={args.max_new_tokens}",
    f"--compilation_cache={tmp / 'xla'}",
  ]
  starts = []
  # Every cache the server keeps starts empty (XDG_CACHE_HOME: the parsed GGUF metadata too).
  env = {"XDG_CACHE_HOME": str(tmp / "xdg")}
  for start in ("cold", "warm"):
    with serving(args.workdir, flags, tmp / f"{start}.log", env) as server:
      starts.append(startup_record(server, start, "fixed"))
      if start == "warm":
        ranks = [int(r) for r in args.ranks.split(",")]
        latency = latency_rows(server.port, ranks, args.prompt, args.new_tokens, args.repeats)
  cold, warm = starts
  return {
    "server_flags": flags,
    "startup": starts,
    "latency": latency,
    "speedup": {
      "launch_to_ready": cold["launch_to_ready_s"] / warm["launch_to_ready_s"],
      "compile": cold["compile_s"] / warm["compile_s"],
    },
  }


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a language-modelling train.py workdir")
  parser.add_argument("--ranks", default="133,288,576")
  parser.add_argument("--max_batch", type=int, default=4)
  parser.add_argument("--context", type=int, default=256)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--prompt", default="To be, or not to be, that is")
  parser.add_argument("--new_tokens", type=int, default=24, help="per timed generation")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default="runs/benchmarks/serve_startup.json")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  report = {"environment": environment(argv, "benchmarks.serve_startup")}
  with tempfile.TemporaryDirectory(prefix="nsn_serve_startup_") as tmp:
    report |= measure(args, pathlib.Path(tmp))
  report["environment"]["load_average_after"] = list(os.getloadavg())
  header = " ".join(f"{c.header:>14}" for c in COLUMNS)
  print(header)
  for row in report["startup"]:
    print(" ".join(f"{row[c.key] * c.scale if c.fmt else row[c.key]:>14{c.fmt}}" for c in COLUMNS))
  speedup = report["speedup"]
  print(
    f"warm/cold: launch→ready {speedup['launch_to_ready']:.2f}×, compile "
    f"{speedup['compile']:.2f}× [target ≥ 5×: "
    f"{'met' if speedup['launch_to_ready'] >= 5 else 'MISSED'} (launch→ready)]"
  )
  for row in report["latency"]:
    print(
      f"rank {row['rank']:>5}: {row['median_s']:.3f} s for {row['tokens']} tokens "
      f"({row['tokens_per_s']:.1f} tokens/s, {row['flops_frac_dense']:.3f} of dense FLOPs)"
    )
  out = write_report(args.out, report)
  print(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
