"""Sweep evaluation ranks of a trained nested model; one checkpoint serves them all.

  .venv/bin/python eval.py --workdir=runs/demo --ranks=all
  .venv/bin/python eval.py --workdir=runs/demo --ranks=every:8 --budgets=0.25,0.5 \\
      --budget_reference=dense
  .venv/bin/python eval.py --workdir=runs/smollm2_genre --ranks=every:48 \\
      --references=runs/smollm2_genre_dense
  .venv/bin/python eval.py --workdir=runs/smollm2_lm_flexrank --ranks=none --profiles   # FlexRank
  .venv/bin/python eval.py --workdir=runs/demo/export/r16              # an export: one row

On a pod slice, run the same command on every host with --multihost (or --coordinator_address,
--num_processes, --process_id): evaluation is then data-parallel over every chip (--mesh).

Writes sweep.json, sweep.csv and frontier.png to --out (default DIR/eval/step_<step>; rows of
an earlier sweep of the same step are kept) and prints the table.
"""

from absl import flags

from nsn_jax import cli, distributed, sharding
from nsn_jax.sweep import run_sweep

_WORKDIR = flags.DEFINE_string(
  "workdir",
  None,
  "A training workdir, a checkpoint directory or an export (python -m nsn_jax.export --out).",
)
_RANKS = flags.DEFINE_string("ranks", "all", "'all', 'every:N', 'none' or a list like '1,2,4'.")
_BUDGETS = flags.DEFINE_list(
  "budgets",
  [],
  "FLOPs fractions in (0, 1], each mapped to the largest rank that fits, e.g. 0.25,0.5.",
)
_REFERENCE = flags.DEFINE_enum(
  "budget_reference", "max_rank", ["max_rank", "dense"], "What a budget is a fraction of."
)
_BATCH = flags.DEFINE_integer(
  "batch_size", None, "Eval batch size (default: the config's).", lower_bound=1
)
_PROFILES = flags.DEFINE_bool(
  "profiles",
  False,
  "Also evaluate each FlexRank profile the "
  "checkpoint saved (config.flexrank.budgets); --ranks=none for only "
  "those.",
)
_REFERENCES = flags.DEFINE_list(
  "references",
  [],
  "Workdirs of runs on the same task to show "
  "beside this one: a dense baseline (model.dense=True) gives one "
  "row, a FlexRank run one row per distilled profile.",
)
_OUT = flags.DEFINE_string(
  "out", None, "Directory for the outputs (default: WORKDIR/eval/step_<step>)."
)
_MESH = flags.DEFINE_string(
  "mesh",
  None,
  "Evaluate data-parallel over a device mesh, e.g. 'data=-1' or 'data=2,tensor=2' (default: "
  "one device; in a cluster: data=-1 over every process's devices).",
)
_JOIN_CLUSTER = cli.launch_flags()
_STEP = flags.DEFINE_integer(
  "step", None, "Checkpoint step to evaluate (default: the newest good one).", lower_bound=0
)
flags.mark_flag_as_required("workdir")


def main():
  _JOIN_CLUSTER()
  spec = _MESH.value or ("data=-1" if distributed.in_cluster() else None)
  mesh = sharding.make_mesh(sharding.parse_mesh(spec)) if spec else None
  try:
    budgets = [float(b) for b in _BUDGETS.value]
  except ValueError:
    raise ValueError(
      f"--budgets={','.join(_BUDGETS.value)}: valid: numbers in (0, 1], e.g. 0.25,0.5"
    ) from None
  run_sweep(
    _WORKDIR.value,
    _RANKS.value,
    budgets,
    _REFERENCE.value,
    _BATCH.value,
    _REFERENCES.value,
    profiles=_PROFILES.value,
    out=_OUT.value,
    step=_STEP.value,
    mesh=mesh,
  )


if __name__ == "__main__":
  cli.run(main)
