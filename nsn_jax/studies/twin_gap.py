"""A nested model against its dense fine-tuned twin at a FLOPs budget, over seeds, with
bootstrap intervals: the paper's "about 5 points below dense at 50% of its FLOPs", resolved.

  python -m nsn_jax.studies.twin_gap --config=configs/minilm_genre.py \
      --workdir=runs/studies/minilm_genre --seeds=0,1,2 --config.data.data_dir=runs/tfds

Per seed the --config trains as it is (WORKDIR/twin_gap/nsn_seed<s>) and as its dense twin
(model.dense, the same steps and data order; dense_seed<s>); finished runs are reused. Both
are scored on --examples of the eval split (0: all of it), the nested model at the largest rank
within --budget of the dense whole forward pass and at --ranks. Intervals are 95% percentile
bootstraps (2,000 draws): per seed over test examples, paired (the same draws for both models);
for the mean over seeds, over seeds and examples together. Writes WORKDIR/twin_gap/twin_gap.json
and twin_gap.png, prints a table and the verdict against --paper_gap.
"""

from __future__ import annotations

import os

from absl import flags

from nsn_jax import flops
from nsn_jax.metrics import say
from nsn_jax.restore import restore_model
from nsn_jax.studies import common, stats
from nsn_jax.sweep import check_budgets

BUDGET = flags.DEFINE_float("budget", 0.5, "FLOPs budget, a fraction of the dense forward pass.")
PAPER_GAP = flags.DEFINE_float("paper_gap", 5.0, "The paper's gap at the budget, in points.")
RANKS, EXAMPLES = "32,64,128,192,384", 0  # defaults of the shared --ranks and --examples


def _seed(base, seed: int, arrays, ranks) -> dict:
  """One seed's per-example scores: the dense twin's and the nested model's at each rank."""
  nsn_dir = common.trained(common.variant(base, seed), f"twin_gap/nsn_seed{seed}")
  dense_dir = common.trained(
    common.variant(base, seed, model__dense=True, eval__ranks=()), f"twin_gap/dense_seed{seed}"
  )
  nsn, dense = restore_model(nsn_dir).model, restore_model(dense_dir).model
  budget_rank = flops.rank_for_budget(nsn, BUDGET.value, "dense", base.data.seq_len)
  n = len(next(iter(arrays.values())))
  scores = lambda workdir, model, rank: common.example_scores(
    base, model, arrays, rank, f"{workdir}/scores/{rank}_{n}.npz", f"{workdir}/done.json"
  )
  say(f"[seed {seed}] scores the dense twin and ranks {sorted({budget_rank, *ranks})}")
  scored = {"dense": scores(dense_dir, dense, None)}
  scored |= {rank: scores(nsn_dir, nsn, rank) for rank in sorted({budget_rank, *ranks})}
  fraction = {
    rank: flops.model_flops(nsn, rank, base.data.seq_len)
    / flops.dense_model_flops(nsn, base.data.seq_len)
    for rank in scored
    if rank != "dense"
  }
  return {"scores": scored, "budget_rank": budget_rank, "flops_frac_dense": fraction}


def run() -> dict:
  base = common.base_config()
  check_budgets([BUDGET.value], "--budget")
  ranks = common.ranks(RANKS, base.model.max_rank)
  seeds = [int(s) for s in common.SEEDS.value]
  arrays = common.eval_examples(base, common.flag(common.EXAMPLES, EXAMPLES))
  per_seed = {seed: _seed(base, seed, arrays, ranks) for seed in seeds}
  result = summarise(per_seed, len(next(iter(arrays.values()))), PAPER_GAP.value)
  result |= {"config_steps": base.train.steps, "budget": BUDGET.value}
  directory = os.path.join(common.WORKDIR.value, "twin_gap")
  common.write_json(result, os.path.join(directory, "twin_gap.json"))
  plot(result, os.path.join(directory, "twin_gap.png"))
  print(format_table(result))
  return result


def summarise(per_seed: dict, n: int, paper_gap: float) -> dict:
  """Accuracies with intervals per seed and rank, the gaps to the twin, and the verdict at the
  budget rank (points = 100 × accuracy)."""
  idx = stats.draws(n)
  seeds = sorted(per_seed)
  ranks = sorted(set.intersection(*(set(per_seed[s]["flops_frac_dense"]) for s in seeds)))
  rows = []
  for rank in ranks:
    pairs = [(per_seed[s]["scores"]["dense"], per_seed[s]["scores"][rank]) for s in seeds]
    each = [stats.paired(a, b, "accuracy", idx) for a, b in pairs]
    rows.append(
      {
        "rank": rank,
        "flops_frac_dense": per_seed[seeds[0]]["flops_frac_dense"][rank],
        "at_budget": [per_seed[s]["budget_rank"] == rank for s in seeds],
        "per_seed": [
          {"seed": s, "dense": e["a"], "dense_ci": e["a_ci"], "nsn": e["b"], "nsn_ci": e["b_ci"]}
          | {"gap": e["diff"], "gap_ci": e["diff_ci"]}
          for s, e in zip(seeds, each)
        ],
        "mean_gap": stats.seed_mean_gap(pairs, "accuracy", idx),
      }
    )
  budget_rank = per_seed[seeds[0]]["budget_rank"]
  at_budget = next(r for r in rows if r["rank"] == budget_rank)
  gap_points = [100 * v for v in at_budget["mean_gap"]["diff_ci"]]
  return {
    "seeds": seeds,
    "examples": n,
    "budget_rank": budget_rank,
    "rows": rows,
    "paper_gap": paper_gap,
    "verdict": stats.verdict(tuple(gap_points), paper_gap),
  }


def format_table(result: dict) -> str:
  """Markdown: per rank, each seed's NSN accuracy and gap to its twin, and the mean gap."""
  lines = [
    "| rank | FLOPs/dense | "
    + " | ".join(f"seed {s}: NSN (gap)" for s in result["seeds"])
    + " | mean gap, 95% CI (points) |",
    "|---:|---:|" + "---:|" * (len(result["seeds"]) + 1),
  ]
  for row in result["rows"]:
    cells = [f"{e['nsn']:.3f} ({100 * e['gap']:+.1f})" for e in row["per_seed"]]
    lo, hi = (100 * v for v in row["mean_gap"]["diff_ci"])
    mark = " (budget)" if row["rank"] == result["budget_rank"] else ""
    lines.append(
      f"| {row['rank']}{mark} | {row['flops_frac_dense']:.3f} | "
      + " | ".join(cells)
      + f" | {100 * row['mean_gap']['diff']:+.1f} [{lo:+.1f}, {hi:+.1f}] |"
    )
  dense = ", ".join(f"{e['dense']:.3f}" for e in result["rows"][0]["per_seed"])
  lines.append(f"dense twins (seeds {result['seeds']}): {dense}; {result['examples']} examples")
  lines.append(f"gap = dense − NSN at the budget rank: {result['verdict']}")
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """Gap to the dense twin (points) against FLOPs: each seed's with its interval, the mean's
  band, the paper's gap as a line."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  x = [row["flops_frac_dense"] for row in result["rows"]]
  for i, seed in enumerate(result["seeds"]):
    seed_rows = [row["per_seed"][i] for row in result["rows"]]
    err = stats.error_bars([e["gap"] for e in seed_rows], [e["gap_ci"] for e in seed_rows], 100)
    ax.errorbar(
      x,
      [100 * e["gap"] for e in seed_rows],
      yerr=err,
      fmt="o",
      ms=3,
      capsize=2,
      color=f"C{i}",
      alpha=0.6,
      label=f"seed {seed}",
    )
  mean = [100 * row["mean_gap"]["diff"] for row in result["rows"]]
  lo, hi = zip(*([100 * v for v in row["mean_gap"]["diff_ci"]] for row in result["rows"]))
  ax.plot(x, mean, "k-", label="mean over seeds")
  ax.fill_between(x, lo, hi, color="k", alpha=0.12, label="95% CI (seeds × examples)")
  ax.axhline(
    result["paper_gap"], color="C3", ls="--", label=f"paper: {result['paper_gap']:g} points"
  )
  ax.axhline(0.0, color="0.5", lw=0.8)
  ax.axvline(result["budget"], color="0.5", ls=":", label=f"budget {result['budget']:g} of dense")
  ax.set_xlabel("FLOPs per example / dense model's (whole forward pass)")
  ax.set_ylabel("dense twin − NSN accuracy (points)")
  ax.set_title(f"gap to the dense twin over {len(result['seeds'])} seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.main(run)
