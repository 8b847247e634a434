"""Inside the trained models: energy decay, learned log-variances, containment, similarity.

  python -m nsn_jax.studies.internals --workdir=runs/studies

Compares the NSN model (the default config) with the plain model (same factorised layers, CE at
rank R only) from the truncation study, training them if they are not in WORKDIR yet. Writes
WORKDIR/internals.json, energy.png, log_variance.png and subspaces.png, and prints tables.
"""

from __future__ import annotations

import json
import os

import numpy as np

from nsn_jax import analysis
from nsn_jax.layers import nsn_layers
from nsn_jax.restore import restore_model
from nsn_jax.studies import common
from nsn_jax.studies.truncation import single_rank

MODELS = ("nsn", "truncation")  # run names in WORKDIR; "truncation" is the plain model
LABELS = {"nsn": "NSN", "truncation": "plain (CE at R only)"}


def log_variance_history(workdir: str) -> dict[int, list[tuple[int, float]]]:
  """{rank: [(step, s_r), ...]} from the run's metrics.jsonl."""
  history: dict[int, list[tuple[int, float]]] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      for key, value in row.items():
        if key.startswith("train/rank_") and key.endswith("/log_var"):
          history.setdefault(int(key.split("_")[1].split("/")[0]), []).append((row["step"], value))
  return history


def run() -> dict:
  base = common.base_config()
  common.train_and_sweep(base, "nsn")
  common.train_and_sweep(single_rank(base, base.model.max_rank), "truncation")
  models = {name: restore_model(os.path.join(common.WORKDIR.value, name)).model for name in MODELS}
  max_rank = base.model.max_rank
  pairs = [(r, 2 * r) for r in (2**i for i in range(max_rank.bit_length())) if 2 * r <= max_rank]
  result = {"energy": {}, "containment": {}, "inter_layer_similarity": {}}
  for name, model in models.items():
    layers = nsn_layers(model)
    result["energy"][name] = {p: analysis.energy_profile(l).tolist() for p, l in layers.items()}
    result["containment"][name] = {
      p: {f"{r}->{r2}": analysis.containment_score(l, r, r2) for r, r2 in pairs}
      for p, l in layers.items()
    }
    chain = list(layers.values())
    result["inter_layer_similarity"][name] = {
      f"{w.path}->{r.path}@{rank}": analysis.inter_layer_similarity(w, r, rank)
      for w, r in zip(chain[:-1], chain[1:])
      for rank, _ in pairs
    }
  history = log_variance_history(os.path.join(common.WORKDIR.value, "nsn"))
  result["log_variance_final"] = {str(r): h[-1][1] for r, h in sorted(history.items())}
  common.write_json(result, os.path.join(common.WORKDIR.value, "internals.json"))
  plot_energy(result["energy"], os.path.join(common.WORKDIR.value, "energy.png"))
  plot_log_variance(history, os.path.join(common.WORKDIR.value, "log_variance.png"))
  plot_subspaces(result, pairs, os.path.join(common.WORKDIR.value, "subspaces.png"))
  print(format_tables(result))
  return result


def format_tables(result: dict) -> str:
  lines = ["containment score (1 = the rank-r map is the principal part of the rank-2r map)"]
  for name, per_layer in result["containment"].items():
    for path, scores in per_layer.items():
      lines.append(
        f"  {LABELS[name]:>22} {path:>9}: " + " ".join(f"{k} {v:.2f}" for k, v in scores.items())
      )
  lines.append("inter-layer similarity (writer output vs reader input subspace, at rank r)")
  for name, scores in result["inter_layer_similarity"].items():
    lines.append(f"  {LABELS[name]:>22}: " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()))
  lines.append(
    "final learned log-variance s_r: "
    + " ".join(f"r={r} {s:.2f}" for r, s in result["log_variance_final"].items())
  )
  return "\n".join(lines)


def plot_energy(energy: dict, path: str) -> None:
  plt = common.pyplot()
  layer_paths = list(next(iter(energy.values())))
  fig, axes = plt.subplots(1, len(layer_paths), figsize=(5 * len(layer_paths), 4), squeeze=False)
  for ax, layer in zip(axes[0], layer_paths):
    for i, (name, per_layer) in enumerate(energy.items()):
      e = np.asarray(per_layer[layer])
      ax.plot(np.arange(1, len(e) + 1), e / e.max(), label=LABELS[name], color=f"C{i}")
    ax.set_yscale("log")
    ax.set_xlabel("component i")
    ax.set_ylabel("energy e_i = |a_i|·|b_i| (÷ max)")
    ax.set_title(f"energy profile, layer {layer}")
    ax.grid(alpha=0.3)
    ax.legend()
  common.save_figure(fig, path)


def plot_subspaces(result: dict, pairs: list[tuple[int, int]], path: str) -> None:
  """Containment r → 2r per layer, and writer/reader similarity per rank, NSN vs plain."""
  plt = common.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  ranks = [r for r, _ in pairs]
  for i, name in enumerate(MODELS):
    for j, (layer, scores) in enumerate(result["containment"][name].items()):
      left.plot(
        ranks,
        list(scores.values()),
        "o-" if j == 0 else "s--",
        color=f"C{i}",
        label=f"{LABELS[name]}, {layer}",
      )
    similarity = result["inter_layer_similarity"][name]
    if similarity:
      right.plot(ranks, list(similarity.values()), "o-", color=f"C{i}", label=LABELS[name])
  left.set_title("containment: rank r inside the principal part of rank 2r")
  right.set_title("inter-layer similarity at rank r")
  for ax, ylabel in ((left, "containment score"), (right, "overlap of subspaces")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  common.save_figure(fig, path)


def plot_log_variance(history: dict, path: str) -> None:
  plt = common.pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for i, (rank, points) in enumerate(sorted(history.items())):
    steps, values = zip(*points)
    left.plot(steps, values, label=f"r={rank}", color=plt.cm.viridis(i / max(1, len(history) - 1)))
  left.set_xlabel("step")
  left.set_ylabel("learned log-variance s_r")
  left.set_title("s_r during training")
  left.legend(fontsize=7, ncol=2)
  ranks = sorted(history)
  right.plot(ranks, [history[r][-1][1] for r in ranks], "o-")
  right.set_xscale("log", base=2)
  right.set_xlabel("rank r")
  right.set_ylabel("final s_r")
  right.set_title("final s_r per rank (lower s = larger weight exp(-s))")
  for ax in (left, right):
    ax.grid(alpha=0.3)
  common.save_figure(fig, path)


if __name__ == "__main__":
  common.main(run)
