"""The rank sweep behind eval.py: every requested rank as its own compiled program.

Restores only the parameters from the one checkpoint, evaluates each rank, and writes
DIR/eval/sweep.json, sweep.csv and frontier.png (accuracy against FLOPs fraction).
"""
from __future__ import annotations

import csv
import json
import os

import jax
import ml_collections
from flax import nnx

from nsn_jax import flops, sharding
from nsn_jax.checkpoint import CheckpointError, Checkpoints, abstract_tree
from nsn_jax.data import pipeline
from nsn_jax.deploy import DeployedLayer, empty_like
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.models import build_model

COLUMNS = ("rank", "trained", "budget", "accuracy", "loss", "flops", "flops_frac_dense",
           "flops_frac_max_rank", "active_params", "latency_ms", "xla_flops")


def parse_ranks(spec: str, max_rank: int) -> list[int]:
  """'all' → 1..R; 'every:N' → N, 2N, … plus 1 and R; '1,2,4' → those. Raises on bad ranks."""
  spec = spec.strip()
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
    raise ValueError(f"--ranks={spec!r} is not 'all', 'every:N' or a list like '1,2,4'.") from None
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
    model = nnx.eval_shape(lambda: empty_like(build_model(config, seed=config.seed), deployed))
    state = nnx.state(model)
    shapes = nnx.to_pure_dict(state)
    if mesh is None:  # not the writer's layout: that mesh may not exist here
      one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
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
              verbose: bool = True) -> list[dict]:
  """Evaluates the requested ranks (and the ranks that budgets map to); writes and returns rows."""
  model, metadata, step = load_params(workdir)
  config = ml_collections.ConfigDict(metadata["config"])
  max_rank = flops.max_rank(model)
  ranks = parse_ranks(ranks_spec, max_rank)
  budget_of = {}
  for budget in budgets:
    rank = flops.rank_for_budget(model, budget, budget_reference)
    budget_of.setdefault(rank, budget)
  ranks = sorted(set(ranks) | set(budget_of))

  images, labels = pipeline.load_split(config.data, config.data.eval_split)
  evaluator = RankEvaluator(nnx.graphdef(model), batch_size or config.eval.batch_size)
  params = nnx.state(model)
  trained = set(metadata["trained_ranks"])
  dense, full = flops.dense_model_flops(model), flops.model_flops(model)
  if verbose:
    print(f"sweeping {len(ranks)} ranks of {workdir} (step {step}, R={max_rank}, "
          f"{len(labels)} {config.data.eval_split} examples)", flush=True)
  rows = []
  for i, rank in enumerate(ranks):
    metrics = evaluator(params, images, labels, rank)
    model_flops = flops.model_flops(model, rank)
    rows.append({
        "rank": rank, "trained": rank in trained, "budget": budget_of.get(rank),
        "accuracy": metrics["accuracy"], "loss": metrics["loss"], "flops": model_flops,
        "flops_frac_dense": model_flops / dense, "flops_frac_max_rank": model_flops / full,
        "active_params": flops.active_params(model, rank),
        "latency_ms": 1e3 * metrics["latency_s"],
        "xla_flops": evaluator.compiled_flops(params, images.shape[1:], rank) /
                     evaluator.batch_size,
    })
    if verbose:
      print(f"  [{i + 1}/{len(ranks)}] rank {rank:4d}  accuracy {metrics['accuracy']:.4f}",
            flush=True)
  write_outputs(rows, os.path.join(workdir, "eval"), f"{workdir} (step {step})",
                budget_reference)
  if verbose:
    print(format_table(rows))
  return rows


def format_table(rows: list[dict]) -> str:
  """The sweep as a fixed-width text table."""
  header = (f"{'rank':>5} {'trained':>7} {'budget':>6} {'accuracy':>8} {'loss':>7} "
            f"{'FLOPs/ex':>9} {'%dense':>6} {'%R':>6} {'params':>8} {'ms/batch':>8}")
  lines = [header, "-" * len(header)]
  for r in rows:
    budget = "" if r["budget"] is None else f"{r['budget']:g}"
    lines.append(
        f"{r['rank']:>5} {'yes' if r['trained'] else 'no':>7} {budget:>6} "
        f"{r['accuracy']:>8.4f} {r['loss']:>7.4f} {r['flops']:>9,} "
        f"{100 * r['flops_frac_dense']:>6.1f} {100 * r['flops_frac_max_rank']:>6.1f} "
        f"{r['active_params']:>8,} {r['latency_ms']:>8.3f}")
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
  for r in (rows[0], rows[-1]):
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
