"""Train a nested model from a config file.

  .venv/bin/python train.py --config=configs/default.py --workdir=runs/demo \\
      [--config.train.steps=500]

Re-running with the same --workdir resumes from its newest good checkpoint. Bad input (a config
field, a path) is one line and exit code 2 (--verbose for the traceback). On several hosts, run
the same command on every host with --multihost (Cloud TPU VMs discover each other) or with
--coordinator_address/--num_processes/--process_id; see docs/tpu.md. A process that fails
tells the others, which stop too (--cluster_timeout bounds every wait).
"""

from absl import flags
from ml_collections import config_flags

from nsn_jax import cli
from nsn_jax.train_lib import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Path to a configs/*.py file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_METRICS_DIR = flags.DEFINE_string(
  "metrics_dir",
  None,
  "Local directory for metrics.jsonl and TensorBoard events (default: the workdir).",
)
_JOIN_CLUSTER = cli.launch_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main():
  _JOIN_CLUSTER()
  train_and_evaluate(_CONFIG.value, _WORKDIR.value, _METRICS_DIR.value)


if __name__ == "__main__":
  cli.run(main)
