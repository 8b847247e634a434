"""NSN MLP on 5,000 real offline MNIST digits: the demo. A few minutes on 2 CPU cores.

  python train.py --config=configs/default.py --workdir=runs/demo
  python eval.py --workdir=runs/demo --ranks=all --budgets=0.25,0.5
  python train.py --config=configs/default.py:smoke --workdir=/tmp/smoke   # seconds; for tests

Any field can be overridden, e.g. `--config.model.max_rank=32 --config.train.steps=500`.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "image_classification"    # | text_classification | language_modelling (nsn_jax.tasks)

  c.data = ml_collections.ConfigDict()
  c.data.name = "mnist5k"            # the offline TFDS builder in nsn_jax/data/mnist5k
  c.data.data_dir = config_dict.placeholder(str)  # None: TFDS's default (~/tensorflow_datasets)
  c.data.image_shape = (28, 28, 1)
  c.data.num_classes = 10
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.cache = True                # hold this process's shard of the train split in memory

  c.model = ml_collections.ConfigDict()
  c.model.name = "nsn_mlp"
  c.model.hidden = (256, 256)
  c.model.max_rank = 64              # R, below both layers' break-even ranks (193, 128)
  c.model.dtype = "float32"

  c.objective = ml_collections.ConfigDict()
  c.objective.name = "uncertainty"   # anchor_only | uniform | uncertainty | uncertainty_logits | uncertainty_ortho
                                     # | flexrank_distill (needs flexrank.budgets)
  c.objective.logits_weight = 1.0
  c.objective.ortho_weight = 0.01

  c.flexrank = ml_collections.ConfigDict()  # FlexRank: docs/flexrank.md (pretrained + surgery)
  c.flexrank.budgets = ()            # fractions of the dense model; () = no profiles
  c.flexrank.budget_unit = "flops"   # flops (whole forward pass) | params (parameter count)
  c.flexrank.probabilities = ()      # α_k per budget for objective flexrank_distill; () = uniform

  c.ranks = ml_collections.ConfigDict()
  c.ranks.kind = "fixed"             # fixed | anchor_variants
  # Every rank up to 8, then powers of two. Ranks below 8 do not interpolate from trained
  # neighbours (held-out ranks 3 and 5 fell ~4 points below trained 2 and 4 with the set
  # 64, 32, ..., 2, 1); from 9 up, held-out ranks land between their trained neighbours.
  c.ranks.fixed = (64, 32, 16, 8, 7, 6, 5, 4, 3, 2, 1)
  c.ranks.min_rank = 1               # anchor_variants: smallest rank drawn after warm-up
  c.ranks.num_variants = 1
  c.ranks.curriculum = "linear"      # linear | step | none
  c.ranks.warmup_fraction = 0.3
  c.ranks.num_stages = 4
  c.ranks.held_out = ()              # never drawn; reported as held-out by the sweep

  c.mesh = ml_collections.ConfigDict()   # device axes; -1 = all remaining devices
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding = ml_collections.ConfigDict()
  c.sharding.rules = ()              # ((path regex, (axis|None, ...)), ...); () = the defaults

  c.train = ml_collections.ConfigDict()
  c.train.steps = 3000
  c.train.batch_size = 128
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.max_to_keep = 3
  c.train.trainable = ("",)          # path regexes of the parameters that train; "" = all
  c.train.multi_rank = "vmap_masked"  # | loop_static (fixed ranks only; docs/benchmarks.md)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.1   # 4,000 training digits: an unregularised MLP overfits

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 1000
  c.eval.ranks = (64, 16, 4)
  c.eval.batch_size = 500

  if arg == "smoke":  # a shape-faithful miniature for tests: seconds on a laptop
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
  elif arg:
    raise ValueError(f"unknown config variant {arg!r}; known: 'smoke'.")
  return c
