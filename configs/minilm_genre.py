"""all-MiniLM-L6-v2 (a BERT encoder) as a nested model on the Shakespeare genre task.

The encoder counterpart of configs/smollm2_genre.py: FFN projections (384 ↔ 1536) become NSN
layers with R = 384, then multi-rank fine-tuning with a mean-pooled classification head.

  python train.py --config=configs/minilm_genre.py --workdir=runs/minilm_genre
  python train.py --config=configs/minilm_genre.py:dense --workdir=runs/minilm_genre_dense
  python eval.py --workdir=runs/minilm_genre --ranks=every:32 --references=runs/minilm_genre_dense
"""
import ml_collections

from configs import smollm2_genre


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = smollm2_genre.get_config(arg)
  c.model.name = "bert_hf"           # model.path "": all-MiniLM-L6-v2 from its offline wheel
  if c.surgery.max_rank and "smoke" not in (arg or ""):
    c.surgery.max_rank = 384         # = min(d_in, d_out): rank R is the pretrained encoder
    c.ranks.fixed = (384, 96)
    c.eval.ranks = (384, 96)
  return c
