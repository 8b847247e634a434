"""Sweep evaluation ranks of a trained nested model; one checkpoint serves them all.

  python eval.py --workdir=runs/demo --ranks=all
  python eval.py --workdir=runs/demo --ranks=every:8 --budgets=0.25,0.5 --budget_reference=dense
  python eval.py --workdir=runs/smollm2_genre --ranks=every:48 --references=runs/smollm2_genre_dense
  python eval.py --workdir=runs/smollm2_lm_flexrank --ranks=none --profiles   # FlexRank profiles

Writes DIR/eval/sweep.json, sweep.csv and frontier.png, and prints the table.
"""
import sys

from absl import app, flags, logging

from nsn_jax.checkpoint import CheckpointError
from nsn_jax.sweep import run_sweep

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_RANKS = flags.DEFINE_string("ranks", "all", "'all', 'every:N', 'none' or a list like '1,2,4'.")
_BUDGETS = flags.DEFINE_list("budgets", [], "FLOPs fractions, each mapped to the largest rank "
                             "that fits, e.g. 0.25,0.5.")
_REFERENCE = flags.DEFINE_enum("budget_reference", "max_rank", ["max_rank", "dense"],
                               "What a budget is a fraction of.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Eval batch size (default: the config's).")
_PROFILES = flags.DEFINE_bool("profiles", False, "Also evaluate each FlexRank profile the "
                              "checkpoint saved (config.flexrank.budgets); --ranks=none for only "
                              "those.")
_REFERENCES = flags.DEFINE_list("references", [], "Workdirs of runs on the same task to show "
                                "beside this one: a dense baseline (surgery.max_rank=0) gives one "
                                "row, a FlexRank run one row per distilled profile.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  try:
    budgets = [float(b) for b in _BUDGETS.value]
    run_sweep(_WORKDIR.value, _RANKS.value, budgets, _REFERENCE.value, _BATCH.value,
              _REFERENCES.value, profiles=_PROFILES.value)
  except (ValueError, CheckpointError) as e:
    sys.exit(f"eval.py: {e}")


if __name__ == "__main__":
  app.run(main)
