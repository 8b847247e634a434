"""Generation as users meet it: compiles and latency for prompts of new lengths with and without
prompt buckets, and greedy tokens/s against Hugging Face transformers on one pinned core.

  python -m benchmarks.generation --out docs/generation-cpu.json          # SmolLM2-135M
  python -m benchmarks.generation --size tiny --out /tmp/gen.json          # seconds (smoke test)

`buckets`: 10 prompts of different lengths, one after another, each in a fresh process per mode:
`per_length` gives every prompt length its own prefill program (what generation did before
buckets), `pow2` the Decoder's default buckets (powers of two). Compiles are counted from JAX's
backend-compile events; the persistent compilation cache is off, so each compile is real.

`tokens_per_s`: greedy decoding, batch 1, a 16-token prompt, 64 new tokens (EOS ignored on both
sides), after a warm-up generation. JAX (nsn_jax's Decoder) and transformers (`generate` on the
same weights, exported with `nsn_jax.export`'s HF writer) each run in their own process pinned
to CPU 0 with one thread, alternated over rounds with the order rotated; the ratio is taken per
round. transformers runs in its own venv (`--torch_python`, default .venv-torch: pip install -r
requirements/torch-reference.txt); without it that part is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

from benchmarks.common import REPO, Column, run_json_worker, write_report

LENGTHS = {"full": (5, 9, 14, 20, 27, 35, 44, 54, 65, 77), "tiny": (3, 6, 11)}
ONE_THREAD = {
  "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
  "OMP_NUM_THREADS": "1",
  "MKL_NUM_THREADS": "1",
  "JAX_PLATFORMS": "cpu",
}
BUCKET_COLUMNS = (
  Column("mode", "mode"),
  Column("call", "call"),
  Column("prompt_tokens", "prompt"),
  Column("compiles", "compiles"),
  Column("seconds", "seconds", ".2f"),
)
TPS_COLUMNS = (
  Column("round", "round"),
  Column("order", "order"),
  Column("jax_tokens_per_s", "JAX tok/s", ".1f"),
  Column("torch_tokens_per_s", "torch tok/s", ".1f"),
  Column("ratio", "JAX/torch", ".2f"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__)
  parser.add_argument("--size", choices=("full", "tiny"), default="full")
  parser.add_argument("--out", default="runs/benchmarks/generation.json")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved tokens/s rounds")
  parser.add_argument("--torch_python", default=str(REPO / ".venv-torch" / "bin" / "python"))
  parser.add_argument("--worker", help=argparse.SUPPRESS)  # buckets | jax_tps (internal)
  parser.add_argument("--mode", help=argparse.SUPPRESS)
  parser.add_argument("--model", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _model_dir(size: str, directory: pathlib.Path) -> pathlib.Path:
  """A Hugging Face directory both sides read: SmolLM2 (full) or a tiny random decoder."""
  from flax import nnx

  from nsn_jax.llm import load_gguf, smollm2_path
  from nsn_jax.llm.hf_decoder import save_hf_decoder
  from nsn_jax.models.llama import LlamaConfig, LlamaModel

  if size == "full":
    _, model, tokenizer = load_gguf(smollm2_path())
  else:
    config = LlamaConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    model, tokenizer = LlamaModel(config, rngs=nnx.Rngs(0)), None
  save_hf_decoder(model, directory, tokenizer)
  return directory


def _prompt(length: int, vocab: int) -> list[int]:
  return [(7 * i + 3) % (vocab - 1) + 1 for i in range(length)]


def bucket_worker(model_dir: str, mode: str, size: str) -> dict:
  """Generates for each prompt length in turn; per call: seconds and backend compiles."""
  import jax

  from nsn_jax.llm import load_pretrained
  from nsn_jax.llm.decode import Decoder

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, **kw: compiles.append(1) if "backend_compile" in event else None
  )
  _, model, _ = load_pretrained(model_dir)
  lengths = LENGTHS[size]
  slots = 128
  buckets = lengths if mode == "per_length" else None  # None: the default powers of two
  decoder = Decoder(model, slots=slots, prompt_buckets=buckets)
  calls = []
  for call, length in enumerate(lengths, 1):
    before, start = len(compiles), time.perf_counter()
    decoder.generate([_prompt(length, model.config.vocab_size)], 16)
    seconds = time.perf_counter() - start
    calls.append({"mode": mode, "call": call, "prompt_tokens": length, "seconds": seconds})
    calls[-1]["compiles"] = len(compiles) - before
  return {"calls": calls}


def jax_tps_worker(model_dir: str, size: str) -> dict:
  """Greedy tokens/s of nsn_jax's Decoder, batch 1, after a warm-up generation."""
  from nsn_jax.llm import load_pretrained
  from nsn_jax.llm.decode import Decoder

  _, model, _ = load_pretrained(model_dir)
  prompt, new = _prompt(16, model.config.vocab_size), _new_tokens(size)
  decoder = Decoder(model, slots=16 + new, prompt_buckets=(16,))
  decoder.generate([prompt], new)  # compiles
  rates = []
  for _ in range(3):
    start = time.perf_counter()
    done = decoder.generate([prompt], new)[0]
    rates.append(len(done.tokens) / (time.perf_counter() - start))
  return {"tokens_per_s": statistics.median(rates)}


def _new_tokens(size: str) -> int:
  return 64 if size == "full" else 8


def _run_worker(argv: list[str], python: str = sys.executable, env=None) -> dict:
  """One worker process pinned to CPU 0; returns its JSON."""
  return run_json_worker(["taskset", "-c", "0", python, *argv], env=env)


def _tokens_per_s(args, model_dir: pathlib.Path) -> tuple[list[dict], list[str]]:
  """Interleaved rounds of the JAX and transformers workers, order rotated each round."""
  if not pathlib.Path(args.torch_python).exists():
    return [], [f"tokens/s vs transformers skipped: no {args.torch_python}"]
  jax_argv = ["-m", "benchmarks.generation", "--worker=jax_tps", f"--model={model_dir}"]
  jax_argv.append(f"--size={args.size}")
  torch_argv = [str(REPO / "benchmarks" / "generation_torch.py"), str(model_dir)]
  torch_argv += ["16", str(_new_tokens(args.size))]
  rows = []
  for round_ in range(args.rounds):
    sides = {
      "jax": lambda: _run_worker(jax_argv, env=ONE_THREAD),
      "torch": lambda: _run_worker(torch_argv, args.torch_python, ONE_THREAD),
    }
    order = ("jax", "torch") if round_ % 2 == 0 else ("torch", "jax")
    result = {side: sides[side]()["tokens_per_s"] for side in order}
    rows.append(
      {
        "round": round_,
        "order": "/".join(order),
        "jax_tokens_per_s": result["jax"],
        "torch_tokens_per_s": result["torch"],
        "ratio": result["jax"] / result["torch"],
      }
    )
  return rows, []


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.worker == "buckets":
    print(json.dumps(bucket_worker(args.model, args.mode, args.size)))
    return {}
  if args.worker == "jax_tps":
    print(json.dumps(jax_tps_worker(args.model, args.size)))
    return {}
  from benchmarks import run as bench_run

  with tempfile.TemporaryDirectory() as scratch:
    model_dir = _model_dir(args.size, pathlib.Path(scratch) / "model")
    calls = []
    for mode in ("per_length", "pow2"):
      argv_ = ["-m", "benchmarks.generation", "--worker=buckets", f"--mode={mode}"]
      calls += _run_worker([*argv_, f"--model={model_dir}", f"--size={args.size}"])["calls"]
    tps, notes = _tokens_per_s(args, model_dir)
  ratios = [row["ratio"] for row in tps]
  summary = {
    mode: {
      "compiles": sum(c["compiles"] for c in calls if c["mode"] == mode),
      "seconds": sum(c["seconds"] for c in calls if c["mode"] == mode),
      "first_call_s": next(c["seconds"] for c in calls if c["mode"] == mode),
    }
    for mode in ("per_length", "pow2")
  }
  if ratios:
    summary["jax_over_torch"] = {
      "median": statistics.median(ratios),
      "min": min(ratios),
      "max": max(ratios),
    }
  report = {
    "environment": {
      **bench_run.environment(argv or sys.argv[1:], "benchmarks.generation"),
      "pinned": "every worker: taskset -c 0; tokens/s: one thread each side",
    },
    "buckets": calls,
    "tokens_per_s": tps,
    "summary": summary,
    "notes": notes,
  }
  print(bench_run.format_table(calls, BUCKET_COLUMNS))
  if tps:
    print(bench_run.format_table(tps, TPS_COLUMNS))
  print(json.dumps(summary, indent=1))
  for note in notes:
    print(note)
  write_report(args.out, report)
  return report


if __name__ == "__main__":
  main()
