"""A pretrained decoder's held-out language-modelling frontier: loss and perplexity against
FLOPs for every way to get a smaller model out of it, with bootstrap intervals.

  python -m nsn_jax.studies.llm_frontier --config=configs/smollm2_lm.py \
      --workdir=runs/studies/smollm2_lm --config.data.data_dir=runs/tfds

Models (trained runs cached in WORKDIR/llm_frontier/, each scored once into scores/):
  dense              the pretrained model as it is
  svd                its surgery's layers truncated by SVD to each rank, no training
  activation-aware   the same, whitened by calibration activations (FlexRank's init)
  dense ft           the pretrained model fine-tuned on the training split (--finetune_steps)
  dense ft + aa      that model truncated activation-aware to each rank, no more training
  nsn                the --config: surgery, then multi-rank fine-tuning for --finetune_steps
  flexrank           the config's FlexRank variant (flexrank_distill from `dense ft`), at the
                     profiles of its budgets
Each is scored on --examples passages of the eval split (the same ones; every passage's token
sums kept), at --ranks and the nested runs' trained ranks. Intervals are 95% percentile
bootstraps over passages (2,000 draws, the same draws for every model: differences are paired).
Writes WORKDIR/llm_frontier/llm_frontier.json and .png and prints a table.
"""

from __future__ import annotations

import os

from absl import flags
from flax import nnx
import numpy as np

from nsn_jax import flops, sharding
from nsn_jax import profiles as flexrank_profiles
from nsn_jax.build import text_encoder
from nsn_jax.data import pipeline
from nsn_jax.metrics import say
from nsn_jax.restore import Restored, restore_model
from nsn_jax.studies import common, stats
from nsn_jax.tasks import config_task
from nsn_jax.train_lib import model_and_method

# Defaults of the shared --ranks, --examples (800 × 63 next tokens ≥ 50k) and --finetune_steps
# (of each fine-tuned model: dense ft, nsn, flexrank).
RANKS, EXAMPLES, FINETUNE_STEPS = "64,133,288", 800, 100
FLEXRANK_BUDGETS = flags.DEFINE_list(
  "flexrank_budgets", ["0.5", "0.6", "0.7", "0.9"], "FlexRank's budgets (of the dense FLOPs)."
)
DENSE, DENSE_FT = "dense", "dense ft"


class _Scorer:
  """Scores models on the held-out passages, each (model, rank or profile) once: the per-passage
  sums are kept in WORKDIR/llm_frontier/scores/ (`common.example_scores`)."""

  def __init__(self, config):
    self.config = config
    self.arrays = common.eval_examples(config, common.flag(common.EXAMPLES, EXAMPLES))
    self.n = len(next(iter(self.arrays.values())))  # passages: a score file's name holds it
    self.directory = os.path.join(common.WORKDIR.value, "llm_frontier", "scores")
    self.rows: list[dict] = []

  def __call__(self, name: str, model: nnx.Module, point, after: str = "", **fields) -> None:
    """Adds the row of `model` at `point` (a rank, a profile or None) called `name`; `after`:
    the done.json of the run that trained it (a newer one makes it score again)."""
    label = fields.get("budget", point)
    path = os.path.join(self.directory, f"{name.replace(' ', '_')}_{label}_{self.n}.npz")
    say(f"[{name}] scores {'as it is' if point is None else label}")
    scores = common.example_scores(self.config, model, self.arrays, point, path, after)
    seq_len = self.config.data.seq_len
    cost = flops.model_flops(model, point, seq_len) / flops.dense_model_flops(model, seq_len)
    rank = point if isinstance(point, int) else None
    self.rows.append({"model": name, "rank": rank, "flops_frac_dense": cost, "scores": scores})
    self.rows[-1] |= fields


def _untrained(config, **changes) -> nnx.Module:
  """The config's pretrained model after its surgery (changes as `common.variant` takes them),
  with calibration batches from the training split for activation-aware factors."""
  config = common.variant(config, config.seed, **changes)
  encoder = text_encoder(config)

  def batches():
    return pipeline.train_batches(config.data, config.train.batch_size, config.seed, None, encoder)

  return model_and_method(config, config_task(config), batches, sharding.make_mesh(config.mesh))[0]


def _trained(config, name: str, **changes) -> tuple[Restored, str]:
  """(the model, its done.json) of `config` fine-tuned for --finetune_steps in
  WORKDIR/llm_frontier/name (cached as `common.trained` does)."""
  steps = common.flag(common.FINETUNE_STEPS, FINETUNE_STEPS)
  config = common.variant(config, config.seed, train__steps=steps, eval__every=steps, **changes)
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 10)
  workdir = common.trained(config, f"llm_frontier/{name}")
  return restore_model(workdir), f"{workdir}/done.json"


def run() -> dict:
  base = common.base_config()
  ranks = common.ranks(RANKS, base.model.max_rank)
  score = _Scorer(base)
  score(DENSE, _untrained(base, model__dense=True), None)
  for name, init in (("svd", "svd"), ("activation-aware", "activation_aware")):
    model = _untrained(base, surgery__init=init)
    for rank in ranks:
      score(name, model, rank)
  dense_ft, done = _trained(base, "dense_ft", model__dense=True, eval__ranks=())
  score(DENSE_FT, dense_ft.model, None, done)
  truncated = _untrained(base, model__init_from=_dense_ft_dir(), surgery__init="activation_aware")
  for rank in ranks:
    score("dense ft + aa", truncated, rank, done)
  nsn, done = _trained(base, "nsn")
  for rank in sorted({*ranks, *base.ranks.fixed}):
    score("nsn", nsn.model, rank, done, trained=rank in base.ranks.fixed)
  _flexrank(base, score)
  result = summarise(score.rows)
  directory = os.path.join(common.WORKDIR.value, "llm_frontier")
  common.write_json(result, os.path.join(directory, "llm_frontier.json"))
  plot(result, os.path.join(directory, "llm_frontier.png"))
  print(format_table(result))
  return result


def _dense_ft_dir() -> str:
  return os.path.join(common.WORKDIR.value, "llm_frontier", "dense_ft")


def _flexrank(base, score: _Scorer) -> None:
  """FlexRank distilled from the fine-tuned dense model, scored at each budget's profile."""
  budgets = tuple(float(b) for b in FLEXRANK_BUDGETS.value)
  restored, done = _trained(
    base,
    "flexrank",
    objective__name="flexrank_distill",
    surgery__init="activation_aware",
    flexrank__budgets=budgets,
    model__init_from=_dense_ft_dir(),
    eval__ranks=(),
  )
  for budget, profile in flexrank_profiles.saved_profiles(restored.metadata).items():
    score("flexrank", restored.model, profile, done, budget=budget, trained=True)


def summarise(rows: list[dict]) -> dict:
  """Each row's loss (nats per token) and perplexity with intervals, and its paired loss
  difference to the pretrained and to the fine-tuned dense model."""
  n = len(rows[0]["scores"]["loss"])
  idx = stats.draws(n)
  by_name = {
    row["model"]: row["scores"] for row in rows if row["rank"] is None and "budget" not in row
  }
  out = []
  for row in rows:
    scores = row.pop("scores")
    loss = stats.metric(scores, "loss", idx)
    row |= {
      "loss": float(stats.metric(scores, "loss")),
      "loss_ci": stats.interval(loss),
      "perplexity": float(np.exp(stats.metric(scores, "loss"))),
      "perplexity_ci": stats.interval(np.exp(loss)),
      "accuracy": float(stats.metric(scores, "accuracy")),
    }
    for reference in (DENSE, DENSE_FT):
      paired = stats.paired(scores, by_name[reference], "loss", idx)
      row[f"loss_minus_{reference.replace(' ', '_')}"] = paired["diff"]
      row[f"loss_minus_{reference.replace(' ', '_')}_ci"] = paired["diff_ci"]
    out.append(row)
  tokens = int(sum(by_name[DENSE]["weight"]))
  return {"passages": n, "tokens": tokens, "rows": out}


def _label(row: dict) -> str:
  if "budget" in row:
    return f"budget {row['budget']:g}"
  return "—" if row["rank"] is None else str(row["rank"])


def format_table(result: dict) -> str:
  """Markdown: model, rank, FLOPs fraction, loss and perplexity with 95% intervals, and the
  paired loss difference to the pretrained model."""
  lines = [
    f"{result['passages']} held-out passages, {result['tokens']:,} scored tokens",
    "| model | rank | FLOPs/dense | loss (nats/token) | perplexity | Δloss vs dense |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for row in result["rows"]:
    lo, hi = row["loss_ci"]
    plo, phi = row["perplexity_ci"]
    dlo, dhi = row["loss_minus_dense_ci"]
    lines.append(
      f"| {row['model']} | {_label(row)} | {row['flops_frac_dense']:.3f} | "
      f"{row['loss']:.3f} [{lo:.3f}, {hi:.3f}] | {row['perplexity']:.1f} [{plo:.1f}, {phi:.1f}] | "
      f"{row['loss_minus_dense']:+.3f} [{dlo:+.3f}, {dhi:+.3f}] |"
    )
  return "\n".join(lines)


def plot(result: dict, path: str) -> None:
  """Perplexity (95% CI bars) against FLOPs as a fraction of dense, one line per model; the two
  dense models as points at their own cost."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  names = list(dict.fromkeys(row["model"] for row in result["rows"]))
  for i, name in enumerate(names):
    rows = sorted(
      (r for r in result["rows"] if r["model"] == name), key=lambda r: r["flops_frac_dense"]
    )
    x = [r["flops_frac_dense"] for r in rows]
    y = [r["perplexity"] for r in rows]
    err = stats.error_bars(y, [r["perplexity_ci"] for r in rows])
    single = len(rows) == 1
    ax.errorbar(
      x,
      y,
      yerr=err,
      marker="*" if single else "o",
      ms=10 if single else 4,
      capsize=2,
      label=name,
      color=f"C{i}",
      linestyle="none" if single else "-",
    )
  ax.set_yscale("log")
  ax.set_xlabel("FLOPs per passage / dense model's (whole forward pass)")
  ax.set_ylabel(f"held-out perplexity ({result['tokens']:,} tokens, 95% CI)")
  ax.set_title("language-modelling frontier")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.main(run)
