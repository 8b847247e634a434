"""Native vs truncation vs NSN (the paper's Figure 2) on the default config's data.

  python -m nsn_jax.studies.truncation --workdir=runs/studies

native:     one model per rank r in --native_ranks (R = r, trained at r only);
truncation: one rank-R model trained at R only, evaluated at every rank by slicing;
nsn:        the default multi-rank config, evaluated at every rank.
Writes WORKDIR/truncation.json and truncation.png and prints the table.
"""

from __future__ import annotations

import os

from absl import flags

from nsn_jax.studies import common

NATIVE_RANKS = flags.DEFINE_list(
  "native_ranks",
  ["1", "2", "4", "8", "16", "32", "64"],
  "Ranks that get their own natively trained model.",
)


def single_rank(config, rank: int):
  """`config` trained with CE at one rank only, with R = `rank`."""
  config = config.copy_and_resolve_references()
  config.model.max_rank = rank
  config.objective.name = "anchor_only"
  config.ranks.kind = "fixed"
  config.ranks.fixed = (rank,)
  config.eval.ranks = (rank,)
  return config


def run() -> dict:
  base = common.base_config()
  max_rank = base.model.max_rank
  native_ranks = sorted(int(r) for r in NATIVE_RANKS.value if int(r) <= max_rank)
  nsn = common.train_and_sweep(base, "nsn")
  truncation = common.train_and_sweep(single_rank(base, max_rank), "truncation")
  # The native model at R is the truncation model itself: same config, trained once.
  native = {
    r: common.train_and_sweep(
      single_rank(base, r), "truncation" if r == max_rank else f"native_r{r}"
    )[-1].accuracy
    for r in native_ranks
  }
  result = {
    "ranks": list(range(1, max_rank + 1)),
    "nsn": [row.accuracy for row in nsn],
    "truncation": [row.accuracy for row in truncation],
    "native": {str(r): a for r, a in native.items()},
    "trained_nsn_ranks": [row.rank for row in nsn if row.trained],
  }
  low = [r for r in result["ranks"] if r <= max(1, max_rank // 8)]
  result["mean_accuracy_at_ranks_up_to_R/8"] = {
    "nsn": common.accuracy_at(nsn, low),
    "truncation": common.accuracy_at(truncation, low),
  }
  common.write_json(result, os.path.join(common.WORKDIR.value, "truncation.json"))
  plot(result, os.path.join(common.WORKDIR.value, "truncation.png"))
  print(format_table(result))
  return result


def format_table(result: dict) -> str:
  lines = [f"{'rank':>5} {'native':>7} {'truncation':>10} {'nsn':>7}"]
  for r in result["ranks"]:
    native = result["native"].get(str(r))
    if native is None and r not in (1, 3, 6, 12, 24, 48):
      continue
    lines.append(
      f"{r:>5} {'' if native is None else f'{native:.4f}':>7} "
      f"{result['truncation'][r - 1]:>10.4f} {result['nsn'][r - 1]:>7.4f}"
    )
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.plot(
    result["ranks"], result["truncation"], label="truncation (one rank-R model, sliced)", color="C3"
  )
  ax.plot(result["ranks"], result["nsn"], label="NSN (one multi-rank model)", color="C0")
  native = sorted((int(r), a) for r, a in result["native"].items())
  ax.plot(*zip(*native), "s--", label="native (one model per rank)", color="C2")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("rank r")
  ax.set_ylabel("test accuracy")
  ax.set_title("one model per rank vs truncation vs NSN")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.main(run)
