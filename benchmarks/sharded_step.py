"""What one device holds and moves in a config's sharded multi-rank train step, compiled for a
mesh of fake CPU devices (no hardware needed): bytes of state per device, XLA's temporaries,
and the collectives in the compiled program, per mesh × rank set × remat × rule set.

  python -m benchmarks.sharded_step --config configs/smollm2_lm.py \\
      --meshes "fsdp=8;tensor=8;fsdp=2,tensor=4" --ranks "576;576,133;576,288,133,64" \\
      --remat none,block --rules default,legacy --out docs/sharded-step.json

`legacy` is the rule set before this one (a on fsdp, b on tensor, kernels on both, no rule for
embeddings): the "before" of docs/tpu.md. Memory numbers are XLA's buffer assignment for the CPU
backend; a TPU compiler assigns its own, so read them as relative, not as a chip's budget.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib.util
import math
import os
import re
import sys
import time

if "jax" not in sys.modules:  # fake devices for the meshes, before jax is first imported
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("PJRT_NPROC", "16")

from flax import nnx
import jax

from benchmarks import run as bench_run
from benchmarks.common import Column, write_report
from nsn_jax import config as config_lib
from nsn_jax import remat, sharding, train_step
from nsn_jax.build import text_encoder
from nsn_jax.data import pipeline
from nsn_jax.methods import build_method
from nsn_jax.tasks import config_task
from nsn_jax.train_step import abstract_train_state, config_train_step

LEGACY_RULES = (
  (r"(^|/)a$", ("fsdp", None)),
  (r"(^|/)b$", (None, "tensor")),
  (r"(^|/)kernel$", ("fsdp", "tensor")),
  (r"(^|/)bias$", ("tensor",)),
)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
COLUMNS = (
  Column("mesh", "mesh"),
  Column("ranks", "ranks"),
  Column("remat", "remat"),
  Column("rules", "rules"),
  Column("state_mib", "state MiB/dev", ".1f"),
  Column("over_ideal", "÷ ideal", ".3f"),
  Column("argument_mib", "args MiB/dev", ".1f"),
  Column("saved_mib", "saved MiB/dev", ".1f"),
  Column("temp_mib", "temp MiB", ".1f"),
  *(Column(name, name) for name in COLLECTIVES),
  Column("compile_s", "compile s", ".1f"),
)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
  """--config and the overrides `load_config` applies (also benchmarks.sharded_load's)."""
  parser.add_argument("--config", required=True, help="a configs/*.py file, e.g. ...py:smoke")
  parser.add_argument("--model_path", help="override config.model.path")
  parser.add_argument("--data_dir", help="override config.data.data_dir")
  parser.add_argument("--min_size", type=int, help="override config.sharding.min_size")
  parser.add_argument(
    "--set", action="append", default=[], help="field=value overrides, e.g. data.seq_len=256"
  )


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded_step", description=__doc__)
  add_config_arguments(parser)
  parser.add_argument("--meshes", default="fsdp=8", help="';'-separated, e.g. fsdp=8;tensor=8")
  parser.add_argument("--ranks", default="", help="';'-separated rank sets (default: config's)")
  parser.add_argument("--remat", default="none", help="comma-separated: none,block")
  parser.add_argument("--rules", default="default", help="comma-separated: default,legacy")
  parser.add_argument(
    "--measure",
    default="state,saved,compiled",
    help="what to measure: state (shapes only), saved (backward activations), compiled (XLA)",
  )
  parser.add_argument("--out", default="runs/benchmarks/sharded_step.json")
  return parser.parse_args(argv)


def load_config(args: argparse.Namespace):
  """`--config path.py[:arg]` as train.py reads it, with the path overrides."""
  path, _, arg = args.config.partition(":")
  spec = importlib.util.spec_from_file_location("benchmarked_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  if args.model_path:
    config.model.path = args.model_path
  if args.data_dir:
    config.data.data_dir = args.data_dir
  if args.min_size is not None:
    config.sharding.min_size = args.min_size
  for override in args.set:
    field, _, value = override.partition("=")
    section, name = field.split(".")
    config[section][name] = type(config[section][name])(ast.literal_eval(value))
  return config


def measure(config, mesh_spec: str, rules: str, parts: set[str]) -> dict:
  """One step on `mesh_spec`: its per-device state against the ideal (everything split over
  every device); with "saved" in `parts` the activations kept for the backward pass, with
  "compiled" XLA's argument and temporary bytes, collectives and compile time."""
  config.sharding.rules = LEGACY_RULES if rules == "legacy" else ()
  mesh = sharding.make_mesh(sharding.parse_mesh(mesh_spec))
  graphdef, state, state_sharding = abstract_train_state(config, mesh)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  held = sharding.bytes_per_device(state, state_sharding)
  row = {"state_mib": held / 2**20, "over_ideal": held * mesh.size / total}
  if parts == {"state"}:
    return row
  method = build_method(config, config_task(config), config.model.max_rank)
  placed = sharding.batch_sharding(mesh)
  encoder = text_encoder(config)
  real = pipeline.train_batches(config.data, config.train.batch_size, 0, encoder=encoder)[0]
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placed) for k, v in real.items()}
  inputs = method.step_inputs(1)
  ranks = jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)
  row["batch"] = list(real[next(iter(real))].shape)
  if "saved" in parts:
    batch_split = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    saved = saved_activation_bytes(config, graphdef, state, method, batch, ranks)
    row["saved_mib"] = saved / batch_split / 2**20
  if "compiled" in parts:
    row.update(_compiled(config, graphdef, method, state, state_sharding, placed, batch, ranks))
  return row


def _compiled(config, graphdef, method, state, state_sharding, placed, batch, ranks) -> dict:
  """The compiled step's argument (state + batch) and temporary bytes per device, collectives
  and compile time."""
  step = config_train_step(config, graphdef, method.loss, state_sharding, placed)
  start = time.perf_counter()
  compiled = step.lower(state, batch, ranks, None).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  found = re.findall(r"= \S+ ([a-z-]+?)(?:-start)?\(", compiled.as_text())
  counts = collections.Counter(op for op in found if op in COLLECTIVES)
  return {
    "argument_mib": memory.argument_size_in_bytes / 2**20,
    "temp_mib": memory.temp_size_in_bytes / 2**20,
    **{name: counts.get(name, 0) for name in COLLECTIVES},
    "compile_s": seconds,
  }


def saved_activation_bytes(config, graphdef, state, method, batch, ranks) -> int:
  """Bytes of the activations the loss's backward pass keeps from its forward pass, for the
  whole global batch, as JAX's autodiff plans them under the config's remat (the residuals of
  `jax.vjp`, traced as shapes only). Weights the backward pass reads are residuals too; they do
  not grow with the batch, so the batch's share is the residuals at 2B minus those at B.

  Independent of any backend's scheduler: XLA:CPU's temporaries barely move under remat
  because its scheduler may run the recomputation early, where a TPU's does not."""
  wrt = train_step.trainable(config)

  def residuals(state, batch, ranks):
    split = nnx.split(nnx.merge(graphdef, state), wrt, ...)
    loss = lambda params: method.loss(nnx.merge(split[0], params, split[2]), batch, ranks, None)
    with remat.rematerialised(config_lib.remat_policy(config)):
      return jax.tree.leaves(jax.vjp(lambda p: loss(p)[0], split[1])[1])

  def total(batch) -> int:
    shapes = jax.eval_shape(residuals, state, batch, ranks)
    return sum(x.size * x.dtype.itemsize for x in shapes)

  double = {
    k: jax.ShapeDtypeStruct((2 * v.shape[0], *v.shape[1:]), v.dtype) for k, v in batch.items()
  }
  return total(double) - total(batch)


def main(argv: list[str]) -> dict:
  args = parse_args(argv)
  config = load_config(args)
  rank_sets = [s.strip() for s in args.ranks.split(";") if s.strip()] or [None]
  rows = []
  for mesh_spec in filter(None, (m.strip() for m in args.meshes.split(";"))):
    for ranks in rank_sets:
      if ranks:
        config.ranks.fixed = tuple(int(r) for r in ranks.split(","))
      for mode in args.remat.split(","):
        config.train.remat = mode.strip()
        for rules in args.rules.split(","):
          config_lib.validate(config, jax.device_count())
          row = {
            "mesh": mesh_spec,
            "ranks": ",".join(map(str, config_lib.fixed_ranks(config))),
            "remat": config.train.remat,
            "rules": rules.strip(),
          }
          row.update(measure(config, mesh_spec, rules.strip(), set(args.measure.split(","))))
          rows.append(row)
          print(bench_run.format_table([row], COLUMNS), flush=True)
  environment = bench_run.environment(argv, "benchmarks.sharded_step")
  report = {"environment": environment, "multi_rank": config.train.multi_rank, "rows": rows}
  print(bench_run.format_table(rows, COLUMNS))
  print(f"wrote {write_report(args.out, report)}")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
