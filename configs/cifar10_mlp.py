"""The paper's from-scratch setting: an NSN MLP on CIFAR-10 (needs a prepared TFDS `cifar10`).

Prepare the data where there is network access, then point data_dir at it:
  python -c "import tensorflow_datasets as tfds; tfds.builder('cifar10', \\
      data_dir='/data/tfds').download_and_prepare(file_format='array_record')"
  .venv/bin/python train.py --config=configs/cifar10_mlp.py --workdir=runs/cifar10 \\
      --config.data.data_dir=/data/tfds
  .venv/bin/python eval.py --workdir=runs/cifar10 --ranks=all

The paper does not state the MLP's widths or R; 3072 → 1024 → 1024 → 10 with R = 128 (below
both layers' break-even ranks, 768 and 512) is this project's choice. `:smoke` shrinks it.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = default.get_config(arg)
  c.data.name = "cifar10"
  c.data.image_shape = (32, 32, 3)
  if "smoke" in (arg or "").split(","):
    return c
  c.model.hidden = (1024, 1024)
  c.model.max_rank = 128  # trained ranks and eval ranks follow R (nsn_jax/config.py)
  c.train.steps = 20000
  c.train.batch_size = 256
  c.train.checkpoint_every = 2000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 0.05
  c.eval.every = 2000
  return c
