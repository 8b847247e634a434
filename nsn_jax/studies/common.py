"""What every study does: train a config variant once, sweep its ranks, summarise, plot."""

from __future__ import annotations

import json
import os

from absl import flags
from flax import nnx
import ml_collections
from ml_collections import config_flags
import numpy as np

from nsn_jax import cli
from nsn_jax.build import text_encoder
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.metrics import say
from nsn_jax.sweep import SweepRow, parse_ranks, read_rows, run_sweep
from nsn_jax.tasks import config_task
from nsn_jax.train_lib import train_and_evaluate

CONFIG = config_flags.DEFINE_config_file(
  "config",
  "configs/default.py",
  "Base config of every run (configs/cifar10_mlp.py for "
  "CIFAR-10; configs/default.py:smoke for a seconds-long miniature); --config.a.b=v overrides.",
  lock_config=True,
)
WORKDIR = flags.DEFINE_string("workdir", "runs/studies", "Root directory shared by studies.")
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (ablation, baselines, twin_gap).")
# Flags several studies read, each with its own default (a module's DEFAULTS): one definition,
# so the studies can be imported together.
RANKS = flags.DEFINE_string(
  "ranks", None, "Ranks compared, e.g. 1,2,4 (above R: dropped). Default: the study's own."
)
FINETUNE_STEPS = flags.DEFINE_integer(
  "finetune_steps", None, "Steps of each fine-tune a study trains. Default: the study's own."
)
EXAMPLES = flags.DEFINE_integer(
  "examples", None, "Eval-split examples scored (0: all). Default: the study's own."
)


def flag(holder: flags.FlagHolder, default):
  """A shared flag's value, or the calling study's `default` where it was not given."""
  return default if holder.value is None else holder.value


def ranks(default: str, max_rank: int) -> list[int]:
  """--ranks (or `default`) as a list; a list's ranks above `max_rank` are dropped (one rank
  list serves models of several R). ConfigError on a bad spec."""
  spec = flag(RANKS, default).strip()
  parse_ranks(spec, None)  # the syntax: one line naming the flag
  if spec[0].isdigit():
    return [r for r in map(int, spec.split(",")) if r <= max_rank]
  return parse_ranks(spec, max_rank)


def base_config() -> ml_collections.ConfigDict:
  """The --config, as an unlocked copy that variants may change."""
  return CONFIG.value.copy_and_resolve_references()


def main(run) -> None:
  """Runs a study's `run()` as a CLI: bad input is one line (`nsn_jax.cli`)."""
  cli.run(run)


def trained(config: ml_collections.ConfigDict, name: str) -> str:
  """The workdir WORKDIR/name with `config` trained in it: a finished run of the same config
  (its done.json) is reused, anything else trains (resuming from its checkpoints)."""
  workdir = os.path.join(WORKDIR.value, name)
  done = os.path.join(workdir, "done.json")
  wanted = json.loads(config.to_json_best_effort())
  if os.path.exists(done):
    with open(done) as f:
      if json.load(f) == wanted:
        say(f"[{name}] reusing the finished run in {workdir}")
        return workdir
  say(f"[{name}] training in {workdir}")
  train_and_evaluate(config, workdir)
  write_json(wanted, done)
  return workdir


def eval_examples(config: ml_collections.ConfigDict, examples: int) -> dict[str, np.ndarray]:
  """The eval split's arrays: `examples` of them drawn by a fixed seed (0: all of them, whatever
  the config's data.eval_examples caps training's evaluation at)."""
  data = config.data.copy_and_resolve_references()
  data.eval_examples = examples
  return pipeline.load_split(data, data.eval_split, text_encoder(config))


def example_scores(
  config: ml_collections.ConfigDict, model, arrays: dict, point, path: str, after: str = ""
) -> dict[str, np.ndarray]:
  """Per-example sums {loss, correct, weight: (N,)} of `model` at `point` (a rank, a profile or
  None) on `arrays` (RankEvaluator(per_row=True)), kept at `path` (.npz) and read from there
  later, unless the file `after` (a trained run's done.json) is newer. Delete it to rescore."""
  if os.path.exists(path) and not (after and os.path.getmtime(after) > os.path.getmtime(path)):
    return dict(np.load(path))
  graphdef, params = nnx.split(model)
  evaluator = RankEvaluator(graphdef, config.eval.batch_size, config_task(config), per_row=True)
  rows = evaluator(params, arrays, point)["rows"]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **rows)
  return rows


def variant(base: ml_collections.ConfigDict, seed: int, **changes) -> ml_collections.ConfigDict:
  """`base` with `seed` and `changes` given as section__field=value (model__dense=True)."""
  config = base.copy_and_resolve_references()
  config.seed = seed
  for key, value in changes.items():
    section, field = key.split("__")
    config[section][field] = value
  return config


def train_and_sweep(config: ml_collections.ConfigDict, name: str) -> list[SweepRow]:
  """Sweep rows (every rank) of `config` trained in WORKDIR/name; reuses a finished run."""
  workdir = trained(config, name)
  sweep = os.path.join(workdir, "eval", "all", "sweep.json")
  if os.path.exists(sweep) and os.path.getmtime(sweep) >= os.path.getmtime(f"{workdir}/done.json"):
    return read_rows(sweep)
  return run_sweep(workdir, "all", verbose=False, out=os.path.dirname(sweep))


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


def save_figure(fig, path: str) -> None:
  """Writes `fig` to `path` (PNG at 120 dpi, tight layout) and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


def pyplot():
  """matplotlib.pyplot on the headless Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
