"""NSN against the strongest baselines a reviewer would pick, at equal FLOPs, over seeds.

  python -m nsn_jax.studies.baselines --workdir=runs/studies [--seeds=0,1,2]

Per seed, on the --config's data (every run is cached in WORKDIR/baselines/):
  dense         the MLP with dense hidden layers, trained normally: one point, its own FLOPs
  dense+svd     that model's hidden layers truncated by SVD to each rank, no more training
  dense+svd+ft  the same (R = r), fine-tuned at that one rank for --finetune_steps (a run per rank)
  nsn           the config's multi-rank model from scratch (uncertainty weighting)
  nsn uniform   the same with the uniform loss sum
  nsn from svd  multi-rank fine-tuning for --finetune_steps, started from the dense model's SVD
Accuracy is reported as the mean over seeds with a 95% confidence interval (Student t), against
the FLOPs of the whole forward pass as a fraction of the dense model's. Writes
WORKDIR/baselines.json and baselines.png and prints a table.
"""

from __future__ import annotations

import os

from flax import nnx
import numpy as np
import scipy.stats

from nsn_jax import flops
from nsn_jax.build import nsn_from_dense
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.restore import restore_model
from nsn_jax.studies import common
from nsn_jax.sweep import run_sweep
from nsn_jax.tasks import config_task

RANKS, FINETUNE_STEPS = "1,2,4,8,12,16,24,32,48,64", 500  # defaults of --ranks, --finetune_steps
METHODS = ("dense+svd", "dense+svd+ft", "nsn", "nsn uniform", "nsn from svd")


def _trained_in(config, name: str) -> str:
  return common.trained(config, os.path.join("baselines", name))


def _seed_rows(base, seed: int, ranks: list[int]) -> list[dict]:
  """Every method's (rank, flops fraction, accuracy) for one seed."""
  finetune = dict(
    train__steps=common.flag(common.FINETUNE_STEPS, FINETUNE_STEPS), optimizer__warmup_steps=0
  )
  dense_dir = _trained_in(
    common.variant(base, seed, model__dense=True, eval__ranks=()), f"dense_seed{seed}"
  )
  dense = restore_model(dense_dir).model
  test = pipeline.load_split(base.data, base.data.eval_split)
  rows = [_row("dense", seed, None, dense, dense, _accuracy(base, test, dense, None))]
  truncated = nsn_from_dense(base, dense)
  rows += [
    _row("dense+svd", seed, r, truncated, dense, _accuracy(base, test, truncated, r)) for r in ranks
  ]
  for r in ranks:
    config = common.variant(
      base,
      seed,
      model__init_from=dense_dir,
      model__max_rank=r,
      ranks__fixed=(r,),
      eval__ranks=(r,),
      objective__name="uniform",
      **finetune,
    )
    model = restore_model(_trained_in(config, f"dense_svd_ft_r{r}_seed{seed}")).model
    rows.append(_row("dense+svd+ft", seed, r, model, dense, _accuracy(base, test, model, r)))
  for method, config in (
    ("nsn", common.variant(base, seed)),
    ("nsn uniform", common.variant(base, seed, objective__name="uniform")),
    ("nsn from svd", common.variant(base, seed, model__init_from=dense_dir, **finetune)),
  ):
    workdir = _trained_in(config, f"{method.replace(' ', '_')}_seed{seed}")
    swept = run_sweep(workdir, ",".join(map(str, ranks)), verbose=False, out=f"{workdir}/eval/b")
    rows += [
      {
        "method": method,
        "seed": seed,
        "rank": row.rank,
        "flops_frac_dense": row.flops_frac_dense,
        "accuracy": row.accuracy,
      }
      for row in swept
    ]
  return rows


def _accuracy(config, arrays: dict, model, rank) -> float:
  task = config_task(config)
  evaluator = RankEvaluator(nnx.graphdef(model), config.eval.batch_size, task)
  return evaluator(nnx.state(model), arrays, rank)["accuracy"]


def _row(method, seed, rank, model, dense, accuracy) -> dict:
  fraction = flops.model_flops(model, rank) / flops.dense_model_flops(dense)
  return {
    "method": method,
    "seed": seed,
    "rank": rank,
    "flops_frac_dense": fraction,
    "accuracy": accuracy,
  }


def summarise(rows: list[dict]) -> list[dict]:
  """(method, rank) → mean accuracy, 95% CI half-width over seeds, FLOPs fraction, n."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault((row["method"], row["rank"]), []).append(row)
  summary = []
  for (method, rank), members in groups.items():
    values = np.asarray([m["accuracy"] for m in members], np.float64)
    n = len(values)
    half = (
      float(scipy.stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / np.sqrt(n)) if n > 1 else None
    )
    summary.append(
      {
        "method": method,
        "rank": rank,
        "n": n,
        "accuracy_mean": float(values.mean()),
        "ci95": half,
        "flops_frac_dense": members[0]["flops_frac_dense"],
      }
    )
  return summary


def run() -> dict:
  base = common.base_config()
  ranks = common.ranks(RANKS, base.model.max_rank)
  seeds = [int(s) for s in common.SEEDS.value]
  rows = [row for seed in seeds for row in _seed_rows(base, seed, ranks)]
  result = {
    "ranks": ranks,
    "seeds": seeds,
    "finetune_steps": common.flag(common.FINETUNE_STEPS, FINETUNE_STEPS),
  }
  result |= {"rows": rows, "summary": summarise(rows)}
  common.write_json(result, os.path.join(common.WORKDIR.value, "baselines.json"))
  plot(result, os.path.join(common.WORKDIR.value, "baselines.png"))
  print(format_table(result))
  return result


def format_table(result: dict) -> str:
  """A markdown table: one row per rank, one column per method, mean ± 95% CI."""
  cell = {(s["method"], s["rank"]): s for s in result["summary"]}
  dense = cell[("dense", None)]
  lines = [
    f"dense (FLOPs 1.00): {_fmt(dense)}",
    "| rank | FLOPs/dense | " + " | ".join(METHODS) + " |",
    "|---|---|" + "---|" * len(METHODS),
  ]
  for r in result["ranks"]:
    fraction = cell[("dense+svd", r)]["flops_frac_dense"]
    values = " | ".join(_fmt(cell.get((m, r))) for m in METHODS)
    lines.append(f"| {r} | {fraction:.3f} | {values} |")
  return "\n".join(lines)


def _fmt(summary: dict | None) -> str:
  if summary is None:
    return "-"
  ci = "" if summary["ci95"] is None else f" ± {summary['ci95']:.3f}"
  return f"{summary['accuracy_mean']:.3f}{ci}"


def plot(result: dict, path: str) -> None:
  """Accuracy (mean, 95% CI bars) against FLOPs as a fraction of dense, one line per method,
  the dense model as a point at 1.0; the y range is the band where the methods differ."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for i, method in enumerate(METHODS):
    points = sorted(
      (s["flops_frac_dense"], s["accuracy_mean"], s["ci95"] or 0.0)
      for s in result["summary"]
      if s["method"] == method
    )
    x, y, err = zip(*points)
    ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=method, color=f"C{i}")
  dense = next(s for s in result["summary"] if s["method"] == "dense")
  ax.errorbar(
    [1.0],
    [dense["accuracy_mean"]],
    yerr=[dense["ci95"] or 0.0],
    marker="*",
    ms=12,
    color="k",
    label="dense",
    linestyle="none",
  )
  means = [s["accuracy_mean"] for s in result["summary"]]
  ax.set_ylim(max(0.0, np.percentile(means, 10) - 0.05), min(1.0, max(means) + 0.02))
  ax.set_xscale("log")
  ax.set_xlabel("FLOPs per example / dense model's")
  ax.set_ylabel(f"test accuracy (mean, 95% CI over {len(result['seeds'])} seeds)")
  ax.set_title("NSN vs the strongest baselines at equal FLOPs")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.main(run)
