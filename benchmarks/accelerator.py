"""One-shot accelerator benchmark: per-rank prefill latency against FLOPs, and the MFU of the bf16
multi-rank training step, on one device (one GPU or TPU chip; ≤ 8 minutes at full size).

  python -m benchmarks.accelerator --out runs/benchmarks/accelerator-h100.json   # full (GPU/TPU)
  python -m benchmarks.accelerator --size=tiny --out=/tmp/accelerator.json        # CPU smoke run

Latency (bf16 compute, float32 parameters): a forward pass of a fixed batch × seq_len of tokens
(logits at every position) for the dense model and the NSN model at each static rank, each its own
jitted program (`benchmarks.common.eval_program`), with XLA's FLOP count of that compiled program,
the count of its unoptimised HLO and `nsn_jax.flops`' analytic count side by side. Two models:
  smollm2   SmolLM2-135M-Instruct, real weights (the offline GGUF), its 90 MLP projections made
            NSN layers by `surgery.decompose_and_replace` (SVD, R = 576);
  llama_1b  a random-weight Llama-3.2-1B shape (`FULL_1B`), initialised by one jitted program
            straight on the device; `surgery.nsn_skeleton` makes its MLP projections NSN layers
            of R = dim / 2 = 1024 whose factors are drawn at random on the device: an SVD of 48
            random 2048 × 8192 kernels would spend part of the 8 minutes (how much on a GPU is
            unmeasured) and change no timing.
Train: the project's step (`create_train_state`, `config_train_step`, the method of
configs/smollm2_lm.py: loop_static, MLP factors trainable) on the SmolLM2 NSN model in bf16,
8 × 512 tokens, for k = 1, 2, 4 ranks (a k that would end past `--budget_s` is skipped, with a
note); step time, XLA's FLOPs of the compiled step, FLOP/s and MFU against the device's dense
bf16 peak (`PEAK_BF16`; null for a CPU or an unknown device).

`--size=tiny` runs in well under a minute on a CPU (~20 s of one core): random-weight one-block
stand-ins of both models (`TINY_LM`, `TINY_1B`; SmolLM2's GGUF alone takes ~20 s to read and
decompose on 2 CPU cores), the same code paths (SVD surgery for the first, random factors for the
second), 2 × 16 tokens, ranks {8, 32} of R = 32, and the train step for k = 2 (ranks 32, 8).
Its numbers only show that the benchmark runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import run as bench_run
from benchmarks.common import Column, eval_program, latency_columns, latency_fields, write_report
from benchmarks.timing import POLICIES, Policy, Timing, time_fn
from benchmarks.train_step import memory_used
from configs import smollm2_lm
from nsn_jax import config as config_lib
from nsn_jax import flops, sharding, surgery
from nsn_jax.layers import nsn_layers
from nsn_jax.llm import load_gguf, smollm2_path
from nsn_jax.methods import build_method
from nsn_jax.models.llama import LlamaConfig, LlamaModel
from nsn_jax.tasks import config_task
from nsn_jax.train_step import config_train_step, create_train_state

DTYPE = jnp.bfloat16  # compute dtype of every program here; parameters stay float32
# Random weights come from XLA's RngBitGenerator: its init programs compile in about half the
# time of threefry's (2.4 s against 4.2 s for the tiny 1B stand-in on the CPU); no timing reads
# the values.
KEY_IMPL = "rbg"

# Dense bf16 FLOP/s of one device (one GPU; one TPU chip as JAX sees it), from the vendors' data
# sheets (without sparsity). Matched as a substring of the lower-cased device_kind, first match
# wins: the PCIe/NVL H100s and the "lite" TPUs come before the names they contain.
PEAK_BF16 = (
  ("h100 pcie", 756e12),
  ("h100 nvl", 835e12),
  ("h100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
  ("h200", 989e12),
  ("a100", 312e12),
  ("tpu v4", 275e12),
  ("tpu v5 lite", 197e12),  # v5e
  ("tpu v5e", 197e12),
  ("tpu v5", 459e12),  # v5p ("TPU v5")
  ("tpu v6 lite", 918e12),  # v6e (Trillium)
  ("tpu v6e", 918e12),
)


@dataclasses.dataclass(frozen=True)
class ModelSetup:
  """A model measured: its shape (None: SmolLM2's, read from its GGUF with its weights; else
  random weights), how its MLP projections become NSN layers of max rank R (`svd`:
  `surgery.decompose_and_replace`; `random`: `_random_pair`), the static ranks, the input."""

  name: str
  config: LlamaConfig | None
  surgery: str  # "svd" | "random"
  max_rank: int
  ranks: tuple[int, ...]
  batch: int
  seq_len: int


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The train step's batch × seq_len tokens and its rank sets (the anchor R first)."""

  batch: int
  seq_len: int
  rank_sets: tuple[tuple[int, ...], ...]


# Llama-3.2-1B's shape: 1.24 B parameters, 0.26 B of them the tied 128k-token embedding.
FULL_1B = LlamaConfig(
  vocab_size=128256,
  dim=2048,
  n_layers=16,
  n_heads=32,
  n_kv_heads=8,
  ffn_dim=8192,
  rope_theta=500000.0,
  max_seq_len=4096,
)
TINY_LM = LlamaConfig(vocab_size=256, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
TINY_1B = LlamaConfig(vocab_size=512, dim=64, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=256)
SETUPS = {
  "full": (
    ModelSetup("smollm2", None, "svd", 576, (72, 144, 288, 576), 8, 1024),
    ModelSetup("llama_1b", FULL_1B, "random", 1024, (128, 256, 512, 1024), 4, 1024),
  ),
  "tiny": (
    ModelSetup("smollm2", TINY_LM, "svd", 32, (8, 32), 2, 16),
    ModelSetup("llama_1b", TINY_1B, "random", 32, (8, 32), 2, 16),
  ),
}
# k = 2 is configs/smollm2_lm.py's own set: R and 133 (half of the dense model's FLOPs). 8 × 512
# tokens: at 16 × 512 XLA's CPU buffer assignment gave the k = 4 step 93 GiB of temporaries
# (per layer and rank the (B, heads, T, T) attention probabilities are kept for the backward).
TRAIN = {
  "full": TrainSetup(8, 512, ((576,), (576, 133), (576, 288, 133, 64))),
  "tiny": TrainSetup(2, 16, ((32, 8),)),  # one compile: ~3-5 s of XLA on a CPU
}

LATENCY_COLUMNS = (
  Column("model", "model"),
  Column("kind", "kind"),
  Column("rank", "rank"),
  Column("tokens", "tokens"),
  *latency_columns(".1f"),
  Column("spread", "spread %", ".1f", 100.0),
  Column("xla_over_analytic", "XLA/analytic", ".3f"),
  Column("flops_vs_dense", "FLOPs/dense", ".3f"),
  Column("peak_fraction", "peak %", ".1f", 100.0),
  Column("compile_s", "compile s", ".1f"),
)
TRAIN_COLUMNS = (
  Column("k", "k"),
  Column("ranks", "ranks"),
  Column("tokens", "tokens"),
  Column("step_s", "ms/step", ".2f", 1e3),
  Column("step_min_s", "min ms", ".2f", 1e3),
  Column("spread", "spread %", ".1f", 100.0),
  Column("xla_flops", "XLA FLOPs", ".3e"),
  Column("xla_flops_per_s", "TFLOP/s", ".2f", 1e-12),
  Column("mfu", "MFU %", ".1f", 100.0),
  Column("tokens_per_s", "tokens/s", ".0f"),
  Column("compile_s", "compile s", ".1f"),
)

_CLOCK = {"start": time.perf_counter()}  # reset by main: progress lines count from its start


def say(message: str) -> None:
  """A progress line with the seconds since the benchmark started."""
  print(f"[{time.perf_counter() - _CLOCK['start']:6.1f} s] {message}", flush=True)


def peak_bf16(device) -> tuple[float | None, str]:
  """(dense bf16 FLOP/s of `device` or None, where that number comes from or why it is None)."""
  if device.platform == "cpu":
    return None, "CPU: no bf16 peak in the table, MFU is null"
  kind = device.device_kind.lower()
  for name, peak in PEAK_BF16:
    if name in kind:
      return peak, f"PEAK_BF16[{name!r}] (device_kind {device.device_kind!r})"
  return None, f"device_kind {device.device_kind!r} is not in PEAK_BF16: MFU is null"


def timed(thunk, policy: Policy) -> tuple[Timing, float]:
  """(`time_fn`'s Timing of thunk(), the spread of its samples: (max − min) / median).

  time_fn keeps only the median and the minimum, so each call is also clocked here; the last
  number × repeats calls are the timed samples, in order."""
  calls = []

  def clocked():
    start = time.perf_counter()
    thunk()
    calls.append(time.perf_counter() - start)

  timing = time_fn(clocked, policy)
  timed_calls = calls[len(calls) - timing.number * timing.repeats :]
  samples = [
    statistics.fmean(timed_calls[i : i + timing.number])
    for i in range(0, len(timed_calls), timing.number)
  ]
  return timing, (max(samples) - min(samples)) / statistics.median(samples)


def cost_flops(lowered, compiled) -> dict:
  """XLA's FLOPs of the compiled program and of its unoptimised HLO (`Lowered.cost_analysis`).

  The second is a cross-check: compiled counts on GPU have been wrong before (jax#22249). A
  backend without a count gives NaN rather than losing a one-shot run's other numbers."""
  return {"xla_flops": _flops(compiled), "hlo_flops": _flops(lowered)}


def _flops(stage) -> float:
  try:
    return float((stage.cost_analysis() or {}).get("flops", math.nan))
  except Exception as e:  # whatever a backend raises for an analysis it lacks
    say(f"no FLOP count from {type(stage).__name__}.cost_analysis(): {e}")
    return math.nan


def _on_device(factory):
  """`factory()`'s model (or tuple of models) with its parameters made by one jitted program on
  the default device: no host copy, and one compile instead of one per initialiser."""
  graphdef, _ = nnx.split(nnx.eval_shape(factory))
  return nnx.merge(graphdef, jax.jit(lambda: nnx.split(factory())[1])())


def _random_llama(config: LlamaConfig) -> LlamaModel:
  """A random-weight decoder of shape `config`, bf16 compute; call it inside `_on_device`."""
  return LlamaModel(config, dtype=DTYPE, rngs=nnx.Rngs(jax.random.key(0, impl=KEY_IMPL)))


def _random_pair(config: LlamaConfig, max_rank: int) -> tuple[LlamaModel, LlamaModel]:
  """(a random-weight dense model, a copy whose MLP projections are NSN layers of rank R =
  max_rank with factors a ~ N(0, 1/d_in), b ~ N(0, 1/R)); call it inside `_on_device`."""
  dense = _random_llama(config)
  nsn = surgery.nsn_skeleton(dense, surgery.MLP_RULES, max_rank)
  key = jax.random.key(1, impl=KEY_IMPL)
  for i, layer in enumerate(nsn_layers(nsn).values()):
    key_a, key_b = jax.random.split(jax.random.fold_in(key, i))
    (d_in, r), d_out = layer.a.shape, layer.b.shape[1]
    layer.a[...] = jax.random.normal(key_a, (d_in, r)) / math.sqrt(d_in)
    layer.b[...] = jax.random.normal(key_b, (r, d_out)) / math.sqrt(r)
  return dense, nsn


def build(setup: ModelSetup) -> tuple[nnx.Module, nnx.Module, dict]:
  """(dense model, NSN model, what the JSON says about them) for `setup`, bf16 compute."""
  start, device = time.perf_counter(), jax.devices()[0].device_kind
  config, weights = setup.config, "random"
  if setup.surgery == "random":
    say(f"{setup.name}: random dense model and NSN twin (R = {setup.max_rank}) on {device}")
    dense, nsn = _on_device(lambda: _random_pair(config, setup.max_rank))
    init = "random factors (surgery.nsn_skeleton)"
  else:
    if config is None:
      say(f"{setup.name}: reading {smollm2_path().name}")
      config, dense, _ = load_gguf(smollm2_path(), DTYPE)
      weights = f"real: {smollm2_path().name}"
    else:
      say(f"{setup.name}: random init on {device}")
      dense = _on_device(lambda: _random_llama(config))
    say(f"{setup.name}: SVD surgery of the MLP projections, R = {setup.max_rank}")
    nsn, _ = surgery.decompose_and_replace(dense, surgery.MLP_RULES, setup.max_rank)
    init = "svd (surgery.decompose_and_replace)"
  jax.block_until_ready(nnx.state(nsn))
  info = {
    "shape": dataclasses.asdict(config),
    "weights": weights,
    "nsn_init": init,
    "nsn_layers": len(nsn_layers(nsn)),
    "max_rank": setup.max_rank,
    "ranks": list(setup.ranks),
    "batch": setup.batch,
    "seq_len": setup.seq_len,
    "params_dense": flops.total_params(dense),
    "params_nsn": flops.total_params(nsn),
    "build_s": time.perf_counter() - start,
  }
  return dense, nsn, info


def _latency_row(setup: ModelSetup, kind: str, rank, program, tokens, analytic: float, policy):
  """One row: compile the static-rank program, count its FLOPs, time it."""
  fn, leaves = program
  say(f"{setup.name} {kind} rank {rank}: compiling")
  start = time.perf_counter()
  lowered = fn.lower(leaves, tokens, rank)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  counts = cost_flops(lowered, compiled)
  timing, spread = timed(lambda: jax.block_until_ready(fn(leaves, tokens, rank)), policy)
  return {
    "model": setup.name,
    "kind": kind,
    "rank": rank,
    "batch": setup.batch,
    "seq_len": setup.seq_len,
    "tokens": setup.batch * setup.seq_len,
    **latency_fields(timing, analytic, counts["xla_flops"]),
    "spread": spread,
    "hlo_flops": counts["hlo_flops"],
    "xla_flops_per_s": counts["xla_flops"] / timing.median_s,
    "xla_over_analytic": counts["xla_flops"] / analytic,
    "lower_s": lower_s,  # tracing + lowering, on the host; compile_s includes it
    "compile_s": compile_s,
  }


def latency_rows(setup, dense, nsn, policy: Policy, peak: float | None) -> list[dict]:
  """The dense model, then the NSN model at each static rank, on one input of random tokens."""
  tokens = np.random.default_rng(1).integers(
    0, dense.config.vocab_size, (setup.batch, setup.seq_len), dtype=np.int32
  )
  tokens = jax.device_put(tokens)  # made on the host: no random-number program to compile
  per_token = setup.batch * setup.seq_len
  dense_flops = per_token * flops.dense_model_flops(nsn, setup.seq_len)
  rows = [_latency_row(setup, "dense", None, eval_program(dense), tokens, dense_flops, policy)]
  program = eval_program(nsn)  # one jitted function; each static rank compiles its program
  for r in setup.ranks:
    analytic = per_token * flops.model_flops(nsn, r, setup.seq_len)
    rows.append(_latency_row(setup, "nsn", r, program, tokens, analytic, policy))
  for row in rows:
    row["vs_dense"] = row["latency_s"] / rows[0]["latency_s"]
    row["flops_vs_dense"] = row["analytic_flops"] / dense_flops
    row["peak_fraction"] = None if peak is None else row["xla_flops_per_s"] / peak
  return rows


def train_config(setup: TrainSetup, max_rank: int, ranks: tuple[int, ...]):
  """configs/smollm2_lm.py in bf16 with this benchmark's batch, ranks and R, validated for one
  device. SVD surgery: activation-aware init needs the Shakespeare data and changes no timing."""
  config = smollm2_lm.get_config()
  config.model.dtype = "bfloat16"
  config.model.max_rank = max_rank
  config.surgery.init = "svd"
  config.data.seq_len = setup.seq_len
  config.train.batch_size = setup.batch
  config.ranks.fixed = ranks
  config.eval.ranks = ranks
  config_lib.validate(config, 1)
  return config


def _train_row(config, graphdef, state, state_sharding, batch, policy: Policy) -> dict:
  """One compiled step on a copy of `state` (the step donates it): XLA FLOPs and step time."""
  mesh_sharding = jax.tree.leaves(batch)[0].sharding
  method = build_method(config, config_task(config), config.model.max_rank)
  step = config_train_step(config, graphdef, method.loss, state_sharding, mesh_sharding)
  ranks = method.step_inputs(1)
  state = jax.tree.map(jnp.copy, state)
  say(f"train k={len(ranks)} ranks {ranks.tolist()}: compiling")
  start = time.perf_counter()
  lowered = step.lower(state, batch, ranks, None)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start

  def one_step():
    nonlocal state
    state, metrics = step(state, batch, ranks, None)
    jax.block_until_ready((state, metrics))

  timing, spread = timed(one_step, policy)
  return {
    "k": len(ranks),
    "ranks": [int(r) for r in ranks],
    "multi_rank": config_lib.multi_rank(config),
    "step_s": timing.median_s,
    "step_min_s": timing.min_s,
    "spread": spread,
    **cost_flops(lowered, compiled),
    "lower_s": lower_s,  # tracing + lowering, on the host; compile_s includes it
    "compile_s": compile_s,
    **memory_used(compiled),
  }


def skip_reason(rows: list[dict], ranks: tuple[int, ...], seconds_left: float) -> str | None:
  """Why the train step for `ranks` must be skipped, or None: its expected time, the last row's
  compile + timing seconds (`row_s`) scaled by k (a loop_static step traces k forward and
  backward passes), exceeds the seconds left."""
  expected = rows[-1]["row_s"] * len(ranks) / rows[-1]["k"] if rows else 0.0
  if expected <= seconds_left:
    return None
  return f"train ranks {list(ranks)} skipped: ~{expected:.0f} s expected, {seconds_left:.0f} s left"


def train_rows(
  setup: TrainSetup, model: nnx.Module, policy: Policy, peak, deadline: float
) -> tuple[list[dict], list[str]]:
  """(a row per rank set of the SmolLM2-LM train step, on one device and one batch of random
  tokens; notes on the rank sets skipped). A rank set is skipped when the last one's time, scaled
  by k, would end past `deadline` (a time.perf_counter() value): the run must fit its slot."""
  config = train_config(setup, flops.max_rank(model), setup.rank_sets[0])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  say("train: placing the train state")
  graphdef, state, state_sharding = create_train_state(config, mesh, model)
  rng = np.random.default_rng(2)
  shape = (setup.batch, setup.seq_len)
  batch = {
    "tokens": rng.integers(0, model.config.vocab_size, shape, dtype=np.int32),
    "mask": np.ones(shape, bool),
  }
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  rows, skipped = [], []
  for ranks in setup.rank_sets:
    if reason := skip_reason(rows, ranks, deadline - time.perf_counter()):
      skipped.append(reason)
      say(reason)
      continue
    config = train_config(setup, flops.max_rank(model), ranks)
    start = time.perf_counter()
    row = _train_row(config, graphdef, state, state_sharding, batch, policy)
    row["row_s"] = time.perf_counter() - start  # compile + timing: what the next k costs, × k
    tokens = setup.batch * setup.seq_len
    forward = tokens * sum(flops.model_flops(model, r, setup.seq_len) for r in ranks)
    row.update(
      batch=setup.batch,
      seq_len=setup.seq_len,
      tokens=tokens,
      tokens_per_s=tokens / row["step_s"],
      analytic_forward_flops=forward,
      xla_flops_per_s=row["xla_flops"] / row["step_s"],
    )
    row["mfu"] = None if peak is None else row["xla_flops_per_s"] / peak
    rows.append(row)
  return rows, skipped


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.accelerator",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--size", choices=("full", "tiny"), default="full")
  parser.add_argument("--out", help="JSON file (default: runs/benchmarks/accelerator-SIZE.json)")
  parser.add_argument(
    "--budget_s",
    type=float,
    default=450.0,
    help="seconds the whole run may take: train rank sets that would end later are skipped",
  )
  return parser.parse_args(argv)


def _notes(peak_note: str, latency: list[dict], train: list[dict]) -> list[str]:
  """What a reader of the JSON must know about the numbers, and any compiled FLOP count well
  below its unoptimised program's (XLA's fusions add elementwise FLOPs, never remove dots)."""
  notes = [
    f"peak bf16: {peak_note}",
    "latency: one forward pass (prefill) of batch × seq_len tokens, logits at every position, "
    "to a ready result; FLOPs per call: analytic = nsn_jax.flops (linear maps, attention, tied "
    "head) × tokens; xla = compiled.cost_analysis(); hlo = the unoptimised program's count",
    "train: XLA's FLOPs of the compiled step (forward and backward of every rank, AdamW on the "
    "MLP factors and log-variances) / median step time; MFU = that / peak bf16 FLOP/s",
  ]
  for row in [*latency, *train]:
    if not row["xla_flops"] >= 0.9 * row["hlo_flops"]:
      what = f"train k={row['k']}" if "k" in row else f"{row['model']} {row['kind']} {row['rank']}"
      notes.append(
        f"{what}: compiled XLA FLOPs {row['xla_flops']:.3e} < 0.9 × the unoptimised "
        f"program's {row['hlo_flops']:.3e}: check the count before quoting FLOP/s or MFU"
      )
  return notes


def main(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints its tables and returns (and writes) the JSON report."""
  _CLOCK["start"] = time.perf_counter()
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  environment = bench_run.environment(argv, "benchmarks.accelerator")
  peak, peak_note = peak_bf16(jax.devices()[0])
  policy = POLICIES[args.size]
  say(f"device: {environment['device_kind']} ({environment['platform']}); {peak_note}")
  if args.size == "full" and environment["platform"] == "cpu":
    say("warning: the full size is sized for a GPU/TPU; on a CPU it takes hours")
  models, latency, train_model = {}, [], None
  for setup in SETUPS[args.size]:
    dense, nsn, models[setup.name] = build(setup)
    latency += latency_rows(setup, dense, nsn, policy, peak)
    if setup.name == "smollm2":
      train_model = nsn
    del dense, nsn  # the 1B model's ~10 GB go before the train step
  deadline = _CLOCK["start"] + args.budget_s
  train, skipped = train_rows(TRAIN[args.size], train_model, policy, peak, deadline)
  report = {
    "environment": environment,
    "size": args.size,
    "policy": dataclasses.asdict(policy),
    "compute_dtype": "bfloat16",
    "peak_bf16_flops": peak,
    "models": models,
    "latency": latency,
    "train": {"config": "configs/smollm2_lm.py", "setup": dataclasses.asdict(TRAIN[args.size])},
    "notes": _notes(peak_note, latency, train) + skipped,
  }
  report["train"]["rows"] = train
  report["wall_s"] = time.perf_counter() - _CLOCK["start"]
  print(bench_run.format_table(latency, LATENCY_COLUMNS))
  print(bench_run.format_table(train, TRAIN_COLUMNS))
  for note in report["notes"]:
    print(f"note: {note}")
  out = write_report(args.out or f"runs/benchmarks/accelerator-{args.size}.json", report)
  say(f"wrote {out}")
  return report


if __name__ == "__main__":
  main()
