"""NSN MLP on scikit-learn's 1,797 real 8×8 digits (`data.name=digits`, built in, offline).

  .venv/bin/python train.py --config=configs/digits_mlp.py --workdir=runs/digits
  .venv/bin/python eval.py --workdir=runs/digits --ranks=all
  .venv/bin/python train.py --config=configs/digits_mlp.py:smoke --workdir=/tmp/digits  # seconds

An MLP 64 → 128 → 128 → 10 whose hidden layers are NSN layers with R = 32, trained 2,000 steps
on the 1,437 training digits and evaluated on the 360 test digits (docs/data.md). Every other
choice, and `:smoke` and `:dense`, is the demo's (configs/default.py).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config(arg)
  c.data.name = "digits"
  c.data.image_shape = (8, 8, 1)
  if "smoke" in (arg or "").split(","):
    return c
  c.model.hidden = (128, 128)
  c.model.max_rank = 32  # trained ranks (32, 16, 8, ..., 1) and eval ranks follow R
  c.train.steps = 2000
  return c
