"""The objective ablation (the paper's table): anchor, ID and OOD accuracy, mean ± std over seeds.

  python -m nsn_jax.studies.ablation --workdir=runs/studies [--seeds=0,1,2]

Every variant is scored on the same rank split: held-out ("OOD") ranks = --held_out (never
trained by any variant), in-distribution ("ID") ranks = every other rank below R. The anchor is R.
Variants (see `VARIANTS`) differ only in the objective and in where ranks come from.
Writes WORKDIR/ablation.json and prints a table.
"""

from __future__ import annotations

import os

from absl import flags

from nsn_jax.studies import common

HELD_OUT = flags.DEFINE_list(
  "held_out",
  ["3", "6", "12", "24", "48"],
  "Ranks no variant trains; averaged as OOD (those below R are kept).",
)

# run name → (label, objective, rank source). "sampled" = the paper's anchor R + one variant per
# step, drawn from a range that widens linearly from R down to rank 1 over the first 30% of steps.
VARIANTS = {
  "anchor_only": ("CE at the anchor only", "anchor_only", "anchor"),
  "uniform": ("uniform sum, sampled ranks", "uniform", "sampled"),
  "uncertainty": ("uncertainty-weighted, sampled ranks (the method)", "uncertainty", "sampled"),
  "logits": ("+ logits regulariser", "uncertainty_logits", "sampled"),
  "ortho": ("+ residual orthogonality", "uncertainty_ortho", "sampled"),
  "fixed_set": ("uncertainty-weighted, fixed rank set vmapped", "uncertainty", "fixed"),
}


def variant_config(base, objective: str, source: str, held_out: tuple[int, ...], seed: int):
  config = base.copy_and_resolve_references()
  config.seed = seed
  config.objective.name = objective
  max_rank = config.model.max_rank
  if source == "anchor":
    config.ranks.kind, config.ranks.fixed = "fixed", (max_rank,)
  elif source == "fixed":  # powers of two below R, none of them held out
    config.ranks.kind = "fixed"
    config.ranks.fixed = tuple(
      r for r in (max_rank >> i for i in range(max_rank.bit_length())) if r not in held_out
    )
  else:
    config.ranks.kind = "anchor_variants"
    config.ranks.min_rank, config.ranks.curriculum = 1, "linear"
    config.ranks.held_out = held_out
  return config


def run() -> dict:
  base = common.base_config()
  max_rank = base.model.max_rank
  held_out = tuple(sorted(int(r) for r in HELD_OUT.value if int(r) < max_rank))
  in_dist = [r for r in range(1, max_rank) if r not in held_out]
  result = {
    "held_out_ranks": list(held_out),
    "id_ranks": in_dist,
    "anchor_rank": max_rank,
    "seeds": [int(s) for s in common.SEEDS.value],
    "variants": {},
  }
  for name, (label, objective, source) in VARIANTS.items():
    per_seed = {"anchor": [], "id": [], "ood": []}
    for seed in result["seeds"]:
      config = variant_config(base, objective, source, held_out, seed)
      rows = common.train_and_sweep(config, f"ablation/{name}/seed{seed}")
      per_seed["anchor"].append(common.accuracy_at(rows, [max_rank]))
      per_seed["id"].append(common.accuracy_at(rows, in_dist))
      per_seed["ood"].append(common.accuracy_at(rows, held_out))
    result["variants"][name] = {
      "label": label,
      **{k: {"per_seed": v, "mean_std": common.mean_std(v)} for k, v in per_seed.items()},
    }
  common.write_json(result, os.path.join(common.WORKDIR.value, "ablation.json"))
  print(format_table(result))
  return result


def format_table(result: dict) -> str:
  """A markdown table: variant | anchor | avg ID | avg OOD (mean ± std over seeds)."""
  lines = ["| objective | anchor acc | avg ID acc | avg OOD acc |", "|---|---:|---:|---:|"]
  for scores in result["variants"].values():
    cells = [
      f"{scores[k]['mean_std'][0]:.3f} ± {scores[k]['mean_std'][1]:.3f}"
      for k in ("anchor", "id", "ood")
    ]
    lines.append(f"| {scores['label']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  common.main(run)
