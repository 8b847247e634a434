"""SmolLM2-135M-Instruct as a nested model for language modelling on held-out Shakespeare.

Same surgery and fine-tuning as configs/smollm2_genre.py, but the task is next-token prediction
on passages of the `shakespeare/lm` split (plays disjoint from training), scored by perplexity
and next-token accuracy; the decoder keeps its own (tied) head, so only the MLP factors train.

  python train.py --config=configs/smollm2_lm.py --workdir=runs/smollm2_lm
  python eval.py --workdir=runs/smollm2_lm --ranks=64,133,288,576 --references=runs/smollm2_lm_dense
  python train.py --config=configs/smollm2_lm.py:flexrank --workdir=runs/smollm2_lm_flexrank
  python eval.py --workdir=runs/smollm2_lm_flexrank --ranks=none --profiles
"""

import ml_collections

from configs import smollm2_genre


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = smollm2_genre.get_config(arg)
  c.task = "language_modelling"
  c.data.name = "shakespeare/lm"
  c.data.num_classes = None  # no labels: the targets are the next tokens
  c.train.trainable = ("mlp/",)
  if "flexrank" in (arg or "") and "smoke" not in arg:
    # The tied 49k-token head is 21% of the forward pass and no rank shrinks it: rank 1 in every
    # MLP layer still costs 0.42 of dense, so the genre budgets from 0.3 do not fit.
    c.flexrank.budgets = (0.5, 0.6, 0.7, 0.9)
  return c
