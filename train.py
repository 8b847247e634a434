"""Train a nested model from a config file.

  python train.py --config=configs/default.py --workdir=runs/demo [--config.train.steps=500]

Re-running with the same --workdir resumes from its newest checkpoint.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from nsn_jax.train_lib import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every file at INFO
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
