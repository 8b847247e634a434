"""The rank sweep behind eval.py: every requested rank as its own compiled program.

Restores only the parameters from the one checkpoint (a workdir, a checkpoint directory or an
export), evaluates each rank (and, with `profiles`, each FlexRank profile the checkpoint saved),
and writes sweep.json, sweep.csv and frontier.png (accuracy against FLOPs fraction) to the out
directory, by default DIR/eval/step_<step>: a sweep of another step never overwrites this one,
and sweeping the same step again adds its rows to (or refreshes them in) the table there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import csv
import dataclasses
import io
import json
import math

from etils import epath
from flax import nnx
import jax
from jax.sharding import Mesh
import numpy as np

from nsn_jax import config as config_lib
from nsn_jax import flops
from nsn_jax import profiles as flexrank_profiles
from nsn_jax.build import mismatches, nsn_from_dense, text_encoder
from nsn_jax.config import ConfigError
from nsn_jax.data import pipeline
from nsn_jax.evaluate import RankEvaluator
from nsn_jax.layers import nsn_layers
from nsn_jax.restore import Restored, checkpoint_directory, restore_model
from nsn_jax.tasks import config_task


@dataclasses.dataclass(frozen=True)
class SweepRow:
  """One evaluated model, rank or profile. FLOPs per example (a sequence model's whole forward
  pass over data.seq_len tokens); fractions of the dense model and of rank R; latency in ms per
  batch; xla_flops: XLA's count of the same forward pass, per example."""

  model: str
  rank: int | None
  profile_ranks: str | None
  trained: bool
  budget: float | None
  accuracy: float
  loss: float
  perplexity: float | None
  flops: int
  flops_frac_dense: float
  flops_frac_max_rank: float
  nsn_frac_dense: float | None
  active_params: int
  latency_ms: float
  xla_flops: float

  @property
  def key(self) -> tuple:
    """What a row is of: a later sweep's row with the same key replaces it (a profile is known
    by its budget: two budgets' profiles may share a rank summary)."""
    return (self.model, self.rank, self.budget if self.profile_ranks else None)


COLUMNS = tuple(f.name for f in dataclasses.fields(SweepRow))


def parse_ranks(spec: str, max_rank: int | None) -> list[int]:
  """'all' → 1..R; 'every:N' → N, 2N, … plus 1 and R; '1,2,4' → those; 'none' → [] (e.g. only
  profiles). Raises ConfigError on a bad spec or ranks outside 1..R. `max_rank` None checks the
  syntax alone, before R is known (and returns [])."""
  spec = spec.strip()
  syntax = "all | every:N | none | a list like 1,2,4"
  try:
    if spec in ("all", "none"):
      return list(range(1, max_rank + 1)) if spec == "all" and max_rank else []
    if spec.startswith("every:"):
      step = int(spec.split(":", 1)[1])
      if step < 1:
        raise ValueError
      return [] if max_rank is None else sorted({1, max_rank, *range(step, max_rank + 1, step)})
    ranks = sorted({int(r) for r in spec.split(",") if r.strip()})
  except ValueError:
    raise ConfigError("--ranks", spec, syntax) from None
  if not ranks:
    raise ConfigError("--ranks", spec, syntax)
  bad = [r for r in ranks if max_rank is not None and not 1 <= r <= max_rank]
  if bad:
    raise ConfigError(
      "--ranks", spec, f"ranks in this model's range 1..{max_rank}", f"ranks {bad} are outside"
    )
  return [] if max_rank is None else ranks


def check_budgets(budgets: Sequence[float], flag: str = "--budgets") -> None:
  """Raises ConfigError naming `flag` unless every budget is a fraction in (0, 1]."""
  bad = [b for b in budgets if not 0 < b <= 1]
  if bad:
    raise ConfigError(
      flag,
      ",".join(f"{b:g}" for b in budgets),
      "numbers in (0, 1], e.g. 0.25,0.5",
      f"{bad} are not fractions",
    )


class _Rows:
  """Turns evaluations of one restored model into SweepRows (costs shared by every row)."""

  def __init__(
    self,
    restored: Restored,
    arrays: dict,
    batch_size: int,
    budgets: dict,
    reference_model: nnx.Module,
    mesh: Mesh | None,
  ):
    self.model, self.arrays, self.budgets = restored.model, arrays, budgets
    self.config = restored.config
    self.seq_len = config_lib.seq_len(self.config)
    self.task = config_task(self.config)
    self.trained = set(restored.metadata.get("trained_ranks", []))
    self.evaluator = RankEvaluator(nnx.graphdef(self.model), batch_size, self.task, mesh)
    per_example = self.seq_len or 1
    self.per_example = per_example
    self.dense = per_example * flops.dense_model_flops(reference_model, self.seq_len)
    self.full = per_example * flops.model_flops(reference_model, None, self.seq_len)

  def row(self, name: str, point, verbose: bool, **fields) -> SweepRow:
    """The row of `point`: a rank, a profile, or None for the model as it is; `fields`
    override columns (a profile's row has rank None and its budget)."""
    params = nnx.state(self.model)
    metrics = self.evaluator(params, self.arrays, point)
    cost = self.per_example * flops.model_flops(self.model, point, self.seq_len)
    if verbose:
      label = (
        f"profile {flexrank_profiles.summarise(point)}"
        if isinstance(point, Mapping)
        else f"rank {point}"
        if point is not None
        else ""
      )
      print(f"  {name} {label}: accuracy {metrics['accuracy']:.4f}", flush=True)
    values = dict(
      model=name,
      rank=point,
      profile_ranks=None,
      trained=point in self.trained,
      budget=self.budgets.get(point) if isinstance(point, int) else None,
      accuracy=metrics["accuracy"],
      loss=metrics["loss"],
      perplexity=(math.exp(metrics["loss"]) if self.task.name == "language_modelling" else None),
      flops=cost,
      flops_frac_dense=cost / self.dense,
      flops_frac_max_rank=cost / self.full,
      nsn_frac_dense=_nsn_fraction(self.model, point),
      active_params=flops.active_params(self.model, point),
      latency_ms=1e3 * metrics["latency_s"],
      xla_flops=self.evaluator.forward_flops(params, self.arrays, point)
      / self.evaluator.batch_size,
    )
    return SweepRow(**(values | fields))

  def profile_rows(self, name: str, saved: Mapping, trained: bool, verbose: bool):
    return [
      self.row(
        name,
        profile,
        verbose,
        rank=None,
        budget=budget,
        trained=trained,
        profile_ranks=flexrank_profiles.summarise(profile),
      )
      for budget, profile in saved.items()
    ]


def run_sweep(
  workdir: str,
  ranks_spec: str = "all",
  budgets: Sequence[float] = (),
  budget_reference: str = "max_rank",
  batch_size: int | None = None,
  references: Sequence[str] = (),
  verbose: bool = True,
  profiles: bool = False,
  out: str | None = None,
  step: int | None = None,
  mesh: Mesh | None = None,
) -> list[SweepRow]:
  """Evaluates the requested ranks (and the ranks that budgets map to) of `workdir`'s newest
  checkpoint (or `step`); with `profiles` each FlexRank profile saved in it (model "flexrank");
  then each reference run on the same task: a dense baseline once ("dense: DIR"), a FlexRank run
  at each of its profiles ("flexrank: DIR"). A model without ranks (a dense run, an export) is
  one row, model "dense" or "export". Writes the rows to `out` (default DIR/eval/step_<step>,
  merged with the rows already there) and returns this sweep's rows. With `mesh` the models are
  restored into their sharded layout and evaluated data-parallel over it (every process of a
  cluster calls this alike; process 0 writes).

  Raises ValueError for bad ranks or budgets, `profiles` on a checkpoint without them, or when
  nothing is requested.
  """
  check_budgets(budgets)
  if batch_size is not None and batch_size < 1:
    raise ConfigError("--batch_size", batch_size, "an integer ≥ 1 (or unset: the config's)")
  parse_ranks(ranks_spec, max_rank=None)  # the syntax, before anything is read
  for reference in references:  # a missing reference fails now, not after the sweep
    checkpoint_directory(reference)
  restored = restore_model(workdir, mesh=mesh, step=step)
  model, config = restored.model, restored.config
  ranks, budget_of = _requested_ranks(restored, ranks_spec, budgets, budget_reference)
  saved = flexrank_profiles.saved_profiles(restored.metadata) if profiles else {}
  if not ranks and not saved and not references:
    raise ValueError("nothing to evaluate: --ranks=none, no --profiles and no --references.")
  arrays = pipeline.load_split(config.data, config.data.eval_split, text_encoder(config))
  batch_size = batch_size or config.eval.batch_size
  if verbose:
    print(
      f"sweeping {len(ranks)} ranks and {len(saved)} profiles of {workdir} (step "
      f"{restored.step}, R={_max_rank(model)}, {len(next(iter(arrays.values())))} "
      f"{config.data.eval_split} examples)",
      flush=True,
    )
  own = _Rows(restored, arrays, batch_size, budget_of, model, mesh)
  kind = "export" if "export" in restored.metadata else "dense"
  rows = [own.row("nsn" if nsn_layers(model) else kind, rank, verbose) for rank in ranks]
  rows += own.profile_rows("flexrank", saved, _distilled(restored.metadata), verbose)
  for reference in references:
    rows += _reference_rows(reference, restored, arrays, batch_size, verbose, mesh, ranks)
  out = out or str(epath.Path(workdir) / "eval" / f"step_{restored.step}")
  merged = write_outputs(rows, out, f"{workdir} (step {restored.step})", budget_reference)
  if verbose:
    print(format_table(merged))
    print(f"wrote {out}/sweep.json, sweep.csv and frontier.png ({len(merged)} rows)")
  return rows


def _max_rank(model: nnx.Module) -> int | None:
  return flops.max_rank(model) if nsn_layers(model) else None


def _requested_ranks(restored: Restored, spec: str, budgets, reference: str):
  """(sorted ranks to evaluate, {rank: the budget it serves}); [None] for a model without
  ranks (evaluated as it is)."""
  spec = spec.strip()
  model, config = restored.model, restored.config
  if not nsn_layers(model):
    if spec not in ("all", "none") or budgets:
      what = "an export" if "export" in restored.metadata else "a dense model"
      raise ValueError(
        f"--ranks={spec!r} / --budgets: {what} has no ranks; valid: --ranks=all "
        "(the model as it is) and no --budgets"
      )
    return ([None] if spec == "all" else []), {}
  seq_len = config_lib.seq_len(config)
  ranks = parse_ranks(spec, flops.max_rank(model))
  budget_of = {}
  for budget in budgets:
    budget_of.setdefault(flops.rank_for_budget(model, budget, reference, seq_len), budget)
  return sorted(set(ranks) | set(budget_of)), budget_of


def _reference_rows(
  reference: str, restored: Restored, arrays, batch_size: int, verbose: bool, mesh, ranks
) -> list[SweepRow]:
  """A reference run's rows beside `restored`'s (costs as fractions of `restored`'s model): a
  dense run as itself and, at each swept rank, truncated by SVD to that rank ("dense+svd:
  DIR", the baseline with no multi-rank training); a FlexRank run at each of its profiles."""
  other = restore_model(reference, mesh=mesh)
  differ = mismatches(restored.config, other.config)
  if differ:
    raise ValueError(
      f"reference {reference} was trained with another {', '.join(differ)}; "
      "a reference must be the same model on the same task and data."
    )
  rows = _Rows(other, arrays, batch_size, {}, restored.model, mesh)
  if _distilled(other.metadata):
    return rows.profile_rows(
      f"flexrank: {reference}", flexrank_profiles.saved_profiles(other.metadata), True, verbose
    )
  if nsn_layers(other.model):
    raise ValueError(
      f"reference {reference} is a nested model; a reference must be dense "
      "(trained with model.dense=True) or a distilled FlexRank run "
      "(objective flexrank_distill)."
    )
  dense = [rows.row(f"dense: {reference}", None, verbose, trained=True)]
  if not nsn_layers(restored.model):
    return dense
  truncated = nsn_from_dense(restored.config, other.model)
  untrained = Restored(truncated, {**other.metadata, "trained_ranks": []}, other.step)
  svd = _Rows(untrained, arrays, batch_size, {}, restored.model, mesh)
  return dense + [svd.row(f"dense+svd: {reference}", r, verbose) for r in ranks]


def _distilled(metadata: dict) -> bool:
  """Whether a checkpoint's FlexRank profiles were trained (distilled), not just searched."""
  return metadata.get("flexrank", {}).get("trained", False)


def _nsn_fraction(model, rank) -> float | None:
  """FLOPs of the NSN layers alone (e.g. the MLPs) at `rank`, as a fraction of the same layers
  dense; None for a model without NSN layers."""
  layers = nsn_layers(model).values()
  if not layers:
    return None
  return sum(flops.nsn_layer_flops(layer, rank) for layer in layers) / sum(
    flops.dense_flops(l.in_features, l.out_features, l.bias is not None) for l in layers
  )


def format_table(rows: Sequence[SweepRow]) -> str:
  """The sweep as a fixed-width text table; a profile shows its per-layer ranks' range for a
  rank, a dense reference its workdir."""
  perplexity = any(r.perplexity is not None for r in rows)
  labels = [r.rank if r.rank is not None else r.profile_ranks or r.model for r in rows]
  width = max(5, *(len(str(label)) for label in labels))
  header = (
    f"{'rank':>{width}} {'trained':>7} {'budget':>6} {'accuracy':>8} {'loss':>7} "
    + (f"{'ppl':>8} " if perplexity else "")
    + f"{'FLOPs/ex':>13} {'%dense':>6} {'%R':>6} {'%NSN':>6} {'params':>11} "
    f"{'ms/batch':>8}"
  )
  lines = [header, "-" * len(header)]
  for r, rank in zip(rows, labels):
    budget = "" if r.budget is None else f"{r.budget:g}"
    lines.append(
      f"{rank:>{width}} {'yes' if r.trained else 'no':>7} {budget:>6} "
      f"{r.accuracy:>8.4f} {r.loss:>7.4f} "
      + (f"{r.perplexity:>8.2f} " if perplexity else "")
      + f"{r.flops:>13,} {100 * r.flops_frac_dense:>6.1f} "
      f"{100 * r.flops_frac_max_rank:>6.1f} "
      + ("     -" if r.nsn_frac_dense is None else f"{100 * r.nsn_frac_dense:>6.1f}")
      + f" {r.active_params:>11,} "
      f"{r.latency_ms:>8.3f}"
    )
  return "\n".join(lines)


def write_outputs(
  rows: Sequence[SweepRow], directory: str, title: str, budget_reference: str = "max_rank"
) -> list[SweepRow]:
  """Merges `rows` into `directory`'s sweep (a row of the same model and rank is replaced) and
  writes sweep.json, sweep.csv and frontier.png there (process 0 only); returns the merged rows,
  ordered by model then FLOPs."""
  directory = epath.Path(directory)  # local or gs://
  path = directory / "sweep.json"
  merged = {row.key: row for row in read_rows(path)} if path.exists() else {}
  merged.update({row.key: row for row in rows})
  order = list(dict.fromkeys(row.model for row in rows))  # this sweep's models first
  merged = sorted(
    merged.values(),
    key=lambda r: (order.index(r.model) if r.model in order else len(order), r.model, r.flops),
  )
  if jax.process_index() != 0:
    return merged
  directory.mkdir(parents=True, exist_ok=True)
  records = [dataclasses.asdict(row) for row in merged]
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=COLUMNS)
  writer.writeheader()
  writer.writerows(records)
  (directory / "sweep.csv").write_text(table.getvalue())
  (directory / "frontier.png").write_bytes(plot_frontier(merged, title, budget_reference))
  (directory / "sweep.json").write_text(json.dumps(records, indent=1))  # last: the merge source
  return merged


def read_rows(path: str | epath.Path) -> list[SweepRow]:
  """The rows of a sweep.json. Raises ValueError naming the file if it is not one."""
  try:
    return [SweepRow(**record) for record in json.loads(epath.Path(path).read_text())]
  except (ValueError, TypeError) as e:
    raise ValueError(
      f"{path} is not a sweep.json this version reads ({e}); use another --out"
    ) from None


def plot_frontier(rows: Sequence[SweepRow], title: str, budget_reference: str) -> bytes:
  """Accuracy against FLOPs (fraction of the dense model) as PNG bytes: dense references as a
  point and a line, their SVD truncations as dashed lines, FlexRank profiles as diamonds, NSN
  ranks as points (trained filled, held-out hollow), budgets at their own FLOPs. The y range is
  the band where the models differ; points below it are counted in a note."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  _plot_references(ax, rows)
  _plot_nsn(ax, [r for r in rows if r.model == "nsn"], budget_reference)
  _zoom(ax, [r.accuracy for r in rows])
  ax.set_xlabel("forward FLOPs, fraction of the dense model")
  ax.set_ylabel("accuracy")
  ax.set_title(f"compute–accuracy frontier: {title}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  return png.getvalue()


def _zoom(ax, accuracies: list[float]) -> None:
  """y from just under the 10th percentile to just over the best: low ranks far below would
  otherwise flatten the band where the choice of rank matters."""
  low = max(0.0, float(np.percentile(accuracies, 10)) - 0.03)
  high = min(1.0, max(accuracies) + 0.01)
  ax.set_ylim(low, high)
  hidden = sum(a < low for a in accuracies)
  if hidden:
    ax.annotate(
      f"{hidden} point{'s' * (hidden > 1)} below {low:.2f}",
      (0.01, 0.01),
      xycoords="axes fraction",
      fontsize=7,
      color="0.4",
    )


def _plot_references(ax, rows: Sequence[SweepRow]) -> None:
  """Dense models and exports as a point at their FLOPs and a horizontal line; a dense model's
  SVD truncations as a dashed line; each FlexRank run's profiles as a line."""
  references = (r for r in rows if r.model.startswith(("dense", "export")))
  for i, r in enumerate(r for r in references if not r.model.startswith("dense+svd")):
    color = f"C{i + 3}"
    ax.axhline(r.accuracy, color=color, linestyle="--", linewidth=1)
    label = f"{r.model} ({r.accuracy:.3f})"
    ax.plot([r.flops_frac_dense], [r.accuracy], "*", ms=12, color=color, label=label, zorder=3)
  for run in dict.fromkeys(r.model for r in rows if r.model.startswith("dense+svd")):
    svd = sorted((r for r in rows if r.model == run), key=lambda r: r.flops)
    x, y = [r.flops_frac_dense for r in svd], [r.accuracy for r in svd]
    ax.plot(x, y, "x--", color="C3", label=f"{run.split(':')[0]} (no multi-rank training)")
  runs = dict.fromkeys(r.model for r in rows if r.model.startswith("flexrank"))
  for color, run in zip(("C2", "C5", "C6", "C7"), runs):
    flex = [r for r in rows if r.model == run]
    distilled = flex[0].trained
    label = f"FlexRank profile{run.removeprefix('flexrank')}" + (
      "" if distilled else " (not distilled)"
    )
    x, y = [r.flops_frac_dense for r in flex], [r.accuracy for r in flex]
    style = dict(color=color, mfc=None if distilled else "none", zorder=2, label=label)
    ax.plot(x, y, "D-" if distilled else "D--", **style)


def budget_x(row: SweepRow, budget_reference: str) -> float:
  """Where `row`'s budget (a fraction of the dense or the max-rank model's FLOPs) lies on the
  frontier's x axis (a fraction of the dense model's FLOPs)."""
  if budget_reference == "dense":
    return row.budget
  return row.budget * row.flops_frac_dense / row.flops_frac_max_rank  # × the max-rank model


def _plot_nsn(ax, rows: Sequence[SweepRow], budget_reference: str) -> None:
  """The nested model's ranks, each budget drawn at its own FLOPs (a fraction of the reference,
  converted to the x axis' fraction of dense) with the rank serving it ringed, the end ranks
  labelled."""
  ax.plot([r.flops_frac_dense for r in rows], [r.accuracy for r in rows], "-", color="0.7")
  for trained, style in (
    (True, dict(color="C0", label="trained rank")),
    (False, dict(facecolors="none", edgecolors="C1", label="held-out rank (never trained)")),
  ):
    points = [r for r in rows if r.trained == trained]
    if points:
      x, y = [r.flops_frac_dense for r in points], [r.accuracy for r in points]
      ax.scatter(x, y, zorder=2, **style)
  for r in (r for r in rows if r.budget is not None):
    ax.axvline(budget_x(r, budget_reference), color="0.5", linestyle=":", linewidth=1)
    ax.scatter([r.flops_frac_dense], [r.accuracy], s=160, facecolors="none", edgecolors="k")
    label = f"budget {r.budget:g} × {budget_reference} FLOPs → r={r.rank}"
    ax.annotate(
      label,
      (budget_x(r, budget_reference), 0.25),
      xycoords=("data", "axes fraction"),
      rotation=90,
      fontsize=7,
      xytext=(-9, 0),
      textcoords="offset points",
    )
  for r in rows[:1] + rows[-1:]:
    ax.annotate(
      f"r={r.rank}",
      (r.flops_frac_dense, r.accuracy),
      textcoords="offset points",
      xytext=(4, -10),
      fontsize=8,
    )
