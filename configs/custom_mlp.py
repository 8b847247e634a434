"""Your own Flax NNX model, trained multi-rank and swept by import path: the demo's MNIST digits on
`examples.user_models.MLP`, a model written with plain `nnx.Linear` and no rank argument.

  .venv/bin/python train.py --config=configs/custom_mlp.py --workdir=runs/custom
  .venv/bin/python eval.py --workdir=runs/custom --ranks=all
  .venv/bin/python train.py --config=configs/custom_mlp.py:smoke --workdir=/tmp/custom  # seconds

The model is built as `model.factory(**model.kwargs, rngs=nnx.Rngs(seed))` (run from the
directory that holds your package, or put it on PYTHONPATH), then surgery replaces the layers
`surgery.rules` pick with NSN layers of R = model.max_rank from their SVD at init. Ranks reach
them through a rank scope (`nsn.at_rank`), so the model's code never changes (docs/design.md).
"""

import ml_collections

from nsn_jax import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = config_lib.defaults()
  c.model.name = "custom"
  c.model.factory = "examples.user_models:MLP"
  c.model.kwargs = ml_collections.ConfigDict(dict(din=784, dmid=256, dout=10))
  c.surgery.rules = ("^linear[12]$",)  # the hidden layers; the 10-way output layer stays dense
  parts = set((arg or "").split(",")) - {""}
  if parts - {"smoke", "dense"}:
    raise ValueError(f"unknown config variant {arg!r}; known: smoke, dense, dense,smoke.")
  if "smoke" in parts:  # seconds on a laptop
    c.model.kwargs.dmid = 32
    c.model.max_rank = 8
    c.ranks.fixed = (8, 4, 2)
    c.train.steps = 20
    c.optimizer.warmup_steps = 2
    c.optimizer.learning_rate = 1e-2
    c.train.batch_size = 32
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.eval.every = 10
    c.eval.ranks = (8, 2)
  if "dense" in parts:
    c.model.dense, c.eval.ranks = True, ()
  return c
