"""Your own Flax NNX model, trained multi-rank and swept by import path: the demo's MNIST digits on
`examples.user_models.MLP`, a model written with plain `nnx.Linear` and no rank argument.

  .venv/bin/python train.py --config=configs/custom_mlp.py --workdir=runs/custom
  .venv/bin/python eval.py --workdir=runs/custom --ranks=all
  .venv/bin/python train.py --config=configs/custom_mlp.py:smoke --workdir=/tmp/custom  # seconds

The model is built as `model.factory(**model.kwargs, rngs=nnx.Rngs(seed))` (run from the
directory that holds your package, or put it on PYTHONPATH), then surgery replaces the layers
`surgery.rules` pick with NSN layers of R = model.max_rank from their SVD at init. Ranks reach
them through a rank scope (`nsn.at_rank`), so the model's code never changes (docs/design.md).
Everything else — training, ranks, `:smoke` and `:dense` — is the demo's (configs/default.py).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config(arg)
  c.model.name = "custom"
  c.model.factory = "examples.user_models:MLP"
  smoke = "smoke" in (arg or "").split(",")
  c.model.kwargs = ml_collections.ConfigDict(dict(din=784, dmid=32 if smoke else 256, dout=10))
  c.surgery.rules = ("^linear[12]$",)  # the hidden layers; the 10-way output layer stays dense
  return c
