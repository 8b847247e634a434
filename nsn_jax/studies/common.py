"""What every study does: train a config variant once, sweep its ranks, summarise, plot."""

from __future__ import annotations

import json
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np

from nsn_jax import cli
from nsn_jax.metrics import say
from nsn_jax.sweep import SweepRow, read_rows, run_sweep
from nsn_jax.train_lib import train_and_evaluate

CONFIG = config_flags.DEFINE_config_file(
  "config",
  "configs/default.py",
  "Base config of every run (configs/cifar10_mlp.py for "
  "CIFAR-10; configs/default.py:smoke for a seconds-long miniature); --config.a.b=v overrides.",
  lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", "runs/studies", "Root directory shared by studies.")
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (ablation).")


def base_config() -> ml_collections.ConfigDict:
  """The --config, as an unlocked copy that variants may change."""
  return CONFIG.value.copy_and_resolve_references()


def main(run) -> None:
  """Runs a study's `run()` as a CLI: bad input is one line (`nsn_jax.cli`)."""
  cli.run(run)


def train_and_sweep(config: ml_collections.ConfigDict, name: str) -> list[SweepRow]:
  """Sweep rows (every rank) of `config` trained in WORKDIR/name; reuses a finished run."""
  workdir = os.path.join(WORKDIR.value, name)
  sweep = os.path.join(workdir, "eval", "all", "sweep.json")
  done = os.path.join(workdir, "done.json")
  if os.path.exists(done) and os.path.exists(sweep):
    with open(done) as f:
      if json.load(f) == json.loads(config.to_json_best_effort()):
        say(f"[{name}] reusing the finished run in {workdir}")
        return read_rows(sweep)
  say(f"[{name}] training in {workdir}")
  train_and_evaluate(config, workdir)
  rows = run_sweep(workdir, "all", verbose=False, out=os.path.dirname(sweep))
  with open(done, "w") as f:
    f.write(config.to_json_best_effort())
  return rows


def accuracy_at(rows: list[dict], ranks) -> float:
  """Mean accuracy over `ranks` (each must be in the sweep)."""
  by_rank = {r.rank: r.accuracy for r in rows}
  return float(np.mean([by_rank[r] for r in ranks]))


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def write_json(obj, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)


def pyplot():
  """matplotlib.pyplot on the headless Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
