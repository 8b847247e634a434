"""NSN MLP on 5,000 real offline MNIST digits: the demo. About a minute on 2 CPU cores.

  .venv/bin/python train.py --config=configs/default.py --workdir=runs/demo
  .venv/bin/python eval.py --workdir=runs/demo --ranks=all --budgets=0.25,0.5
  .venv/bin/python train.py --config=configs/default.py:smoke --workdir=/tmp/smoke  # seconds
  .venv/bin/python train.py --config=configs/default.py:dense --workdir=runs/demo_dense

Every field, its meaning and its default is in nsn_jax/config.py (`defaults()`, which is this
demo); any field can be overridden, e.g. `--config.model.max_rank=32 --config.train.steps=500`.
`:dense` is the baseline twin: the same MLP with plain dense hidden layers.
"""

import ml_collections

from nsn_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_lib.defaults()  # the demo itself, with each choice explained there
  parts = set((arg or "").split(",")) - {""}
  if parts - {"smoke", "dense"}:
    raise ValueError(f"unknown config variant {arg!r}; known: smoke, dense, dense,smoke.")
  if "smoke" in parts:  # a shape-faithful miniature for tests: seconds on a laptop
    c.model.hidden = (32,)
    c.model.max_rank = 8
    c.ranks.fixed = (8, 4, 2)
    c.ranks.min_rank = 2
    c.train.steps = 20
    c.optimizer.warmup_steps = 2
    c.optimizer.learning_rate = 1e-2  # the miniature must learn visibly in 20-40 steps
    c.train.batch_size = 32
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.eval.every = 10
    c.eval.ranks = (8, 2)
  if "dense" in parts:  # the same MLP with plain dense hidden layers, evaluated as itself
    c.model.dense, c.eval.ranks = True, ()
  return c
