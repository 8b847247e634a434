"""The rank sweep behind eval.py: every requested rank as its own compiled program.

Restores only the parameters from the one checkpoint, evaluates each rank (and, with `profiles`,
each FlexRank profile the checkpoint saved), and writes DIR/eval/sweep.json, sweep.csv and
frontier.png (accuracy against FLOPs fraction).
"""
from __future__ import annotations

from collections.abc import Mapping
import csv
import json
import math
import os

import jax
import ml_collections
from flax import nnx

from nsn_jax import flops, profiles as flexrank_profiles, sharding
from nsn_jax.checkpoint import CheckpointError, Checkpoints, abstract_tree
from nsn_jax.data import pipeline
from nsn_jax.deploy import DeployedLayer, empty_like
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.layers import nsn_layers
from nsn_jax.models.build import build_model, mismatches, text_encoder
from nsn_jax.tasks import get_task

COLUMNS = ("model", "rank", "profile_ranks", "trained", "budget", "accuracy", "loss", "perplexity",
           "flops", "flops_frac_dense", "flops_frac_max_rank", "nsn_frac_dense", "active_params",
           "latency_ms", "xla_flops")


def parse_ranks(spec: str, max_rank: int) -> list[int]:
  """'all' → 1..R; 'every:N' → N, 2N, … plus 1 and R; '1,2,4' → those; 'none' → [] (e.g. only
  profiles). Raises on bad ranks."""
  spec = spec.strip()
  if spec == "none":
    return []
  if spec == "all":
    return list(range(1, max_rank + 1))
  try:
    if spec.startswith("every:"):
      step = int(spec.split(":", 1)[1])
      if step < 1:
        raise ValueError
      return sorted({1, max_rank, *range(step, max_rank + 1, step)})
    ranks = sorted({int(r) for r in spec.split(",") if r.strip()})
  except ValueError:
    raise ValueError(f"--ranks={spec!r} is not 'all', 'every:N', 'none' or a list like "
                     "'1,2,4'.") from None
  bad = [r for r in ranks if not 1 <= r <= max_rank]
  if bad or not ranks:
    raise ValueError(f"--ranks={spec!r}: ranks {bad} are outside this model's range 1..{max_rank}.")
  return ranks


def load_params(workdir: str, mesh: jax.sharding.Mesh | None = None):
  """(model with restored parameters, checkpoint metadata, step) from workdir's checkpoint.

  Only the `params` item is read: no optimizer state is restored. With `mesh`, parameters are
  restored directly into the layout the checkpoint's sharding rules give on that mesh, whatever
  mesh wrote them; without, onto the default device.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory {directory}; train first: "
                          f"python train.py --config=... --workdir={workdir}")
  return restore_model(directory, mesh)


def restore_model(directory: str, mesh: jax.sharding.Mesh | None = None):
  """(model, metadata, step) from a checkpoint directory: a training run's, or an export's.

  The model is rebuilt as shapes from the metadata's config (and, for an export, the deployed
  form of each layer, `nsn_jax.deploy`), then only its parameters are restored into it.
  """
  checkpoints = Checkpoints(directory)
  try:
    metadata = checkpoints.metadata()
    config = ml_collections.ConfigDict(metadata["config"])
    deployed = [DeployedLayer(**entry) for entry in metadata.get("deployed", [])]
    model = nnx.eval_shape(lambda: empty_like(
        build_model(config, seed=config.seed, pretrained=False), deployed))
    state = nnx.state(model)
    shapes = nnx.to_pure_dict(state)
    if mesh is None:  # not the writer's layout: that mesh may not exist here
      one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      layout = jax.tree.map(lambda _: one_device, shapes)
    else:
      layout = sharding.tree_shardings(shapes, mesh,
                                       sharding.rules_from_config(config.get("sharding")))
    step, params, _, metadata = checkpoints.restore(abstract_tree(shapes, layout))
  finally:
    checkpoints.close()
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model, metadata, step


def run_sweep(workdir: str, ranks_spec: str = "all", budgets: list[float] = (),
              budget_reference: str = "max_rank", batch_size: int | None = None,
              references: list[str] = (), verbose: bool = True,
              profiles: bool = False) -> list[dict]:
  """Evaluates the requested ranks (and the ranks that budgets map to), with `profiles` each
  FlexRank profile saved in the checkpoint (model "flexrank", rank None, its budget and a summary
  of its per-layer ranks), then each reference workdir trained on the same task: a dense
  baseline once (model "dense: DIR"), a FlexRank run at each of its profiles ("flexrank: DIR");
  writes and returns rows.

  FLOPs are per example: for a sequence model, the whole forward pass over data.seq_len tokens.
  Raises ValueError for `profiles` on a checkpoint without them, or when nothing is requested.
  """
  model, metadata, step = load_params(workdir)
  config = ml_collections.ConfigDict(metadata["config"])
  task = get_task(config.get("task", "image_classification"))
  seq_len = config.data.get("seq_len")  # None: an image model, one row per example
  ranks = parse_ranks(ranks_spec, flops.rank_count(model))
  budget_of = {}
  for budget in budgets:
    rank = flops.rank_for_budget(model, budget, budget_reference, seq_len)
    budget_of.setdefault(rank, budget)
  ranks = sorted(set(ranks) | set(budget_of))
  saved = flexrank_profiles.saved_profiles(metadata) if profiles else {}
  if not ranks and not saved and not references:
    raise ValueError("nothing to evaluate: --ranks=none, no --profiles and no --references.")

  arrays = pipeline.load_split(config.data, config.data.eval_split, text_encoder(config))
  batch_size = batch_size or config.eval.batch_size
  trained = set(metadata["trained_ranks"])
  per_example = seq_len or 1
  dense = per_example * flops.dense_model_flops(model, seq_len)
  full = per_example * flops.model_flops(model, None, seq_len)
  n = len(arrays[task.keys[0]])
  if verbose:
    print(f"sweeping {len(ranks)} ranks and {len(saved)} profiles of {workdir} (step {step}, "
          f"R={flops.rank_count(model)}, {n} {config.data.eval_split} examples)", flush=True)

  def row(model, rank, name, evaluator):
    metrics = evaluator(nnx.state(model), arrays, rank)
    cost = per_example * flops.model_flops(model, rank, seq_len)
    if verbose:
      label = (f"profile {flexrank_profiles.summarise(rank)}" if isinstance(rank, Mapping)
               else f"rank {rank}")
      print(f"  {name} {label}: accuracy {metrics['accuracy']:.4f}", flush=True)
    return {
        "model": name, "rank": rank, "profile_ranks": None, "trained": rank in trained,
        "budget": budget_of.get(rank),
        "accuracy": metrics["accuracy"], "loss": metrics["loss"],
        "perplexity": (math.exp(metrics["loss"]) if task.name == "language_modelling"
                       else None),
        "flops": cost, "flops_frac_dense": cost / dense, "flops_frac_max_rank": cost / full,
        "nsn_frac_dense": _nsn_fraction(model, rank),
        "active_params": flops.active_params(model, rank),
        "latency_ms": 1e3 * metrics["latency_s"],
        "xla_flops": evaluator.forward_flops(nnx.state(model), arrays, rank) / batch_size,
    }

  def profile_rows(model, name, saved, trained, evaluator):
    return [row(model, profile, name, evaluator) | {
        "rank": None, "profile_ranks": flexrank_profiles.summarise(profile),
        "trained": trained, "budget": budget} for budget, profile in saved.items()]

  evaluator = RankEvaluator(nnx.graphdef(model), batch_size, task)
  rows = [row(model, rank, "nsn", evaluator) for rank in ranks]
  rows += profile_rows(model, "flexrank", saved, _distilled(metadata), evaluator)
  for reference in references:
    other, other_metadata, _ = load_params(reference)
    differ = mismatches(config, ml_collections.ConfigDict(other_metadata["config"]))
    if differ:
      raise ValueError(f"reference {reference} was trained with another {', '.join(differ)}; "
                       "a reference must be the same model on the same task and data.")
    other_evaluator = RankEvaluator(nnx.graphdef(other), batch_size, task)
    if _distilled(other_metadata):
      rows += profile_rows(other, f"flexrank: {reference}",
                           flexrank_profiles.saved_profiles(other_metadata), True,
                           other_evaluator)
    elif nsn_layers(other):
      raise ValueError(f"reference {reference} is a nested model; a reference must be dense "
                       "(trained with surgery.max_rank=0) or a distilled FlexRank run "
                       "(objective flexrank_distill).")
    else:
      rows.append(row(other, 1, f"dense: {reference}", other_evaluator) | {
          "rank": None, "trained": True})
  write_outputs(rows, os.path.join(workdir, "eval"), f"{workdir} (step {step})",
                budget_reference)
  if verbose:
    print(format_table(rows))
  return rows


def _distilled(metadata: dict) -> bool:
  """Whether a checkpoint's FlexRank profiles were trained (distilled), not just searched."""
  return metadata.get("flexrank", {}).get("trained", False)


def _nsn_fraction(model, rank) -> float | None:
  """FLOPs of the NSN layers alone (e.g. the MLPs) at `rank`, as a fraction of the same layers
  dense; None for a model without NSN layers."""
  layers = nsn_layers(model).values()
  if not layers:
    return None
  return (sum(flops.nsn_layer_flops(layer, rank) for layer in layers) /
          sum(flops.dense_flops(l.in_features, l.out_features, l.bias is not None)
              for l in layers))


def format_table(rows: list[dict]) -> str:
  """The sweep as a fixed-width text table; a profile shows its per-layer ranks' range for a
  rank, a dense reference its workdir."""
  perplexity = any(r["perplexity"] is not None for r in rows)
  labels = [r["rank"] if r["rank"] is not None else r["profile_ranks"] or r["model"]
            for r in rows]
  width = max(5, *(len(str(label)) for label in labels))
  header = (f"{'rank':>{width}} {'trained':>7} {'budget':>6} {'accuracy':>8} {'loss':>7} "
            + (f"{'ppl':>8} " if perplexity else "") +
            f"{'FLOPs/ex':>13} {'%dense':>6} {'%R':>6} {'%NSN':>6} {'params':>11} "
            f"{'ms/batch':>8}")
  lines = [header, "-" * len(header)]
  for r, rank in zip(rows, labels):
    budget = "" if r["budget"] is None else f"{r['budget']:g}"
    lines.append(
        f"{rank:>{width}} {'yes' if r['trained'] else 'no':>7} {budget:>6} "
        f"{r['accuracy']:>8.4f} {r['loss']:>7.4f} "
        + (f"{r['perplexity']:>8.2f} " if perplexity else "") +
        f"{r['flops']:>13,} {100 * r['flops_frac_dense']:>6.1f} "
        f"{100 * r['flops_frac_max_rank']:>6.1f} "
        + ("     -" if r["nsn_frac_dense"] is None else f"{100 * r['nsn_frac_dense']:>6.1f}") +
        f" {r['active_params']:>11,} "
        f"{r['latency_ms']:>8.3f}")
  return "\n".join(lines)


def write_outputs(rows: list[dict], directory: str, title: str,
                  budget_reference: str = "max_rank") -> None:
  """sweep.json, sweep.csv and frontier.png in `directory` (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "sweep.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(directory, "sweep.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  plot_frontier(rows, os.path.join(directory, "frontier.png"), title, budget_reference)


def plot_frontier(rows: list[dict], path: str, title: str, budget_reference: str) -> None:
  """Accuracy against FLOPs (fraction of the dense model); trained ranks filled, held-out hollow."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, r in enumerate(r for r in rows if r["model"].startswith("dense")):  # references
    ax.axhline(r["accuracy"], color=f"C{i + 3}", linestyle="--", linewidth=1,
               label=f"{r['model']} ({r['accuracy']:.3f})")
  runs = dict.fromkeys(r["model"] for r in rows if r["model"].startswith("flexrank"))
  for color, run in zip(("C2", "C5", "C6", "C7"), runs):
    flex = [r for r in rows if r["model"] == run]
    distilled = flex[0]["trained"]
    label = "FlexRank profile" + run.removeprefix("flexrank") + ("" if distilled else
                                                                 " (not distilled)")
    ax.plot([r["flops_frac_dense"] for r in flex], [r["accuracy"] for r in flex],
            "D-" if distilled else "D--", color=color, mfc=None if distilled else "none",
            zorder=2, label=label)
  rows = [r for r in rows if r["model"] == "nsn"]
  x = [r["flops_frac_dense"] for r in rows]
  ax.plot(x, [r["accuracy"] for r in rows], "-", color="0.7", zorder=1)
  for trained, style in ((True, dict(color="C0", label="trained rank")),
                         (False, dict(facecolors="none", edgecolors="C1",
                                      label="held-out rank (never trained)"))):
    points = [r for r in rows if r["trained"] == trained]
    if points:
      ax.scatter([r["flops_frac_dense"] for r in points], [r["accuracy"] for r in points],
                 zorder=2, **style)
  for r in rows:
    if r["budget"] is not None:
      ax.axvline(r["flops_frac_dense"], color="0.5", linestyle=":", linewidth=1)
      ax.annotate(f"budget {r['budget']:g} of {budget_reference} → r={r['rank']}",
                  (r["flops_frac_dense"], 0.25),
                  xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                  xytext=(-9, 0), textcoords="offset points")
  for r in rows[:1] + rows[-1:]:
    ax.annotate(f"r={r['rank']}", (r["flops_frac_dense"], r["accuracy"]),
                textcoords="offset points", xytext=(4, -10), fontsize=8)
  ax.set_xlabel("forward FLOPs, fraction of the dense model")
  ax.set_ylabel("accuracy")
  ax.set_title(f"compute–accuracy frontier: {title}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
