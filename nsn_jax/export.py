"""Export one budget of a trained nested model as a standalone, smaller checkpoint.

  .venv/bin/python -m nsn_jax.export --workdir=runs/demo --rank=16 --out=runs/demo/export/r16
  .venv/bin/python -m nsn_jax.export --workdir=runs/demo --budget=0.5 --out=runs/demo/export/half
  .venv/bin/python -m nsn_jax.export --workdir=runs/flex --profile_budget=0.5 --out=runs/flex/p50

The export holds only what the chosen budget runs (`nsn_jax.deploy`: each NSN layer folded to
dense, factorised or GAR, whichever is cheapest at its rank), so its parameter count and FLOPs
really shrink. `nsn_jax.restore.restore_model(OUT)` reloads it (it then runs with `rank=None`)
and `eval.py --workdir=OUT` evaluates it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import os

from absl import flags
from etils import epath
from flax import nnx

from nsn_jax import cli, flops, profiles
from nsn_jax import config as config_lib
from nsn_jax.checkpoint import Checkpoints
from nsn_jax.deploy import FORMS, POLICIES, DeployedLayer, deploy, format_report
from nsn_jax.restore import Restored, restore_model
from nsn_jax.sweep import check_budgets


def export(
  workdir: str,
  out: str,
  rank: int | Mapping[str, int] | None = None,
  budget: float | None = None,
  budget_reference: str = "max_rank",
  form: str = "cheapest",
  profile_budget: float | None = None,
) -> dict:
  """Writes the budget (a global `rank`, a per-layer profile, a FLOPs `budget` mapped to the
  largest global rank that fits, or the FlexRank profile the checkpoint saved for
  `profile_budget`) of workdir's newest checkpoint to `out`; returns its metadata.

  `out` must not exist yet: an export never overwrites. The checkpoint is committed atomically
  (orbax renames it into place only when complete).
  """
  if sum(x is not None for x in (rank, budget, profile_budget)) != 1:
    raise ValueError("give exactly one of --rank (or a profile), --budget and --profile_budget.")
  if not out:
    raise ValueError("--out is required: a new directory for the export.")
  if epath.Path(out).exists():
    raise ValueError(f"--out={out} already exists; an export never overwrites: choose a new one.")
  if budget is not None:
    check_budgets([budget], "--budget")
  restored = restore_model(workdir)
  if "export" in restored.metadata:
    raise ValueError(f"--workdir={workdir} is an export already; export from the training run.")
  rank = _chosen_rank(restored, rank, budget, budget_reference, profile_budget)
  deployed, report = deploy(restored.model, rank, form)
  params = nnx.to_pure_dict(nnx.state(deployed))
  seq_len = config_lib.seq_len(restored.config)
  # A sequence model's FLOPs include attention over its context: per token at data.seq_len, and
  # per example (seq_len tokens) in the metadata, as eval.py reports them.
  metadata = {
    **restored.metadata,
    "deployed": [dataclasses.asdict(entry) for entry in report],
    "export": {
      "source": workdir if "://" in workdir else os.path.abspath(workdir),
      "source_step": restored.step,
      "rank": dict(rank) if isinstance(rank, Mapping) else rank,
      "budget": budget,
      "profile_budget": profile_budget,
      "budget_reference": budget_reference,
      "form_policy": form,
      "flops": (seq_len or 1) * flops.model_flops(deployed, None, seq_len),
      "dense_flops": (seq_len or 1) * flops.dense_model_flops(deployed, seq_len),
      "params": flops.total_params(deployed),
      "source_params": flops.total_params(restored.model),
    },
  }
  checkpoints = Checkpoints(out, max_to_keep=1)
  try:
    checkpoints.save(restored.step, params, None, metadata)
    checkpoints.wait()
  finally:
    checkpoints.close()
  return metadata


def _chosen_rank(restored: Restored, rank, budget, budget_reference: str, profile_budget):
  """The global rank or profile to export: `rank` itself, the largest rank within `budget`, or
  the saved profile of `profile_budget`."""
  if budget is not None:
    seq_len = config_lib.seq_len(restored.config)
    return flops.rank_for_budget(restored.model, budget, budget_reference, seq_len)
  if profile_budget is not None:
    saved = profiles.saved_profiles(restored.metadata)
    if profile_budget not in saved:
      raise ValueError(
        f"--profile_budget={profile_budget:g}: no saved profile for it; the checkpoint has "
        f"{', '.join(f'{b:g}' for b in saved)}."
      )
    return saved[profile_budget]
  return rank


def _define_flags() -> None:
  """The CLI's flags, defined only when this module runs as a program, so importing `export`
  (e.g. through `nsn.export_model`) adds no flags to the importer's."""
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_string("out", None, "New directory for the exported checkpoint.")
  flags.DEFINE_integer("rank", None, "Global rank to export.")
  flags.DEFINE_float("budget", None, "FLOPs fraction; exports the largest rank that fits.")
  flags.DEFINE_enum(
    "budget_reference", "max_rank", ["max_rank", "dense"], "What --budget is a fraction of."
  )
  flags.DEFINE_float(
    "profile_budget",
    None,
    "Exports the FlexRank profile the checkpoint saved for this budget (config.flexrank.budgets).",
  )
  flags.DEFINE_enum(
    "form",
    "cheapest",
    [*POLICIES, *FORMS],
    "Per-layer form: the cheapest in FLOPs, 'matmul' "
    "(dense or factorised, faster on CPU), or one form for every layer.",
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main():
  f = flags.FLAGS
  metadata = export(
    f.workdir, f.out, f.rank, f.budget, f.budget_reference, f.form, f.profile_budget
  )
  info = metadata["export"]
  print(format_report([DeployedLayer(**entry) for entry in metadata["deployed"]]))
  what = (
    f"the profile for budget {info['profile_budget']:g} (ranks {profiles.summarise(info['rank'])})"
    if info["profile_budget"] is not None
    else f"rank {info['rank']}"
  )
  kept = 100 * info["params"] / info["source_params"]
  print(
    f"exported {what} of {info['source']} (step {info['source_step']}) to "
    f"{f.out}: {info['params']:,} parameters ({kept:.1f}% "
    f"of the nested model's {info['source_params']:,}), {info['flops']:,} FLOPs per example "
    f"({100 * info['flops'] / info['dense_flops']:.1f}% of dense)"
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
