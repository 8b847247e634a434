"""FlexRank's nested rank profiles of a whole model: searched at train start, sampled by the
distillation steps, saved in and read back from checkpoint metadata.

A budget is a fraction of the dense model's whole forward pass (`flops.dense_model_flops`:
attention over the context, dense layers, head), or of its parameter count, so the per-layer DP
(`flexrank.nested_profiles`) gets what is left for the NSN layers once everything a rank does not
change is paid for. FLOPs are per row (per token for a sequence model), as everywhere in
`nsn_jax.flops`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

from flax import nnx
from flax.core import FrozenDict
import numpy as np

from nsn_jax import flexrank, flops
from nsn_jax.layers import nsn_layers

UNITS = ("flops", "params")


@dataclasses.dataclass(frozen=True)
class Profile:
  """One searched profile: per-layer ranks within `budget` × the dense model's `unit`.

  ranks: {path: r}, a hashable mapping of ints (a static argument of `RankEvaluator`).
  flops_frac_dense: whole-model FLOPs per row / dense. params_frac_dense: parameters read /
  dense parameters. error: Σ over the NSN layers of the squared relative output error on the
  calibration rows.
  """

  budget: float
  unit: str
  ranks: Mapping[str, int]
  flops_frac_dense: float
  params_frac_dense: float
  error: float

  def __post_init__(self):
    # Plain Python numbers whatever the search computed with (numpy scalars): JSON as they are.
    object.__setattr__(self, "ranks", _frozen_ranks(self.ranks))
    for name in ("budget", "flops_frac_dense", "params_frac_dense", "error"):
      object.__setattr__(self, name, float(getattr(self, name)))

  def to_json(self) -> dict:
    """The record checkpoint metadata stores: a dict of the fields, ranks a plain dict."""
    return {
      **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
      "ranks": dict(self.ranks),
    }

  @classmethod
  def from_json(cls, record: Mapping) -> Profile:
    """The inverse of `to_json`. Raises ValueError naming the fields a record lacks."""
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in names if name not in record]
    if missing:
      raise ValueError(f"a FlexRank profile record lacks {missing}: {dict(record)}.")
    return cls(**{name: record[name] for name in names})


def _frozen_ranks(ranks: Mapping[str, int]) -> FrozenDict:
  return FrozenDict({path: int(r) for path, r in ranks.items()})


def _budget_and_ranks(profile: Profile | Mapping) -> tuple[float, FrozenDict]:
  """(budget, ranks) of a `Profile` or of a JSON record, older ones without every field too."""
  if isinstance(profile, Profile):
    return profile.budget, profile.ranks
  return float(profile["budget"]), _frozen_ranks(profile["ranks"])


def search_profiles(
  model: nnx.Module,
  dense: nnx.Module,
  calibration: Mapping[str, np.ndarray],
  budgets: Sequence[float],
  seq_len: int | None = None,
  unit: str = "flops",
) -> list[Profile]:
  """One nested profile per budget (in the order given), each within budget × the dense model.

  Args:
    model: the model after surgery. dense: the same model before it (the kernels the factors
      approximate, at the NSN layers' paths). calibration: {path: (n, d_in)} inputs of each NSN
      layer (`surgery.capture_inputs`). budgets: fractions of the dense model's whole-forward
      FLOPs per row (`dense_model_flops(model, seq_len)`, unit "flops") or of its parameter
      count (unit "params": embeddings and head included, as a deployed checkpoint holds them).
  Returns:
    One `Profile` per budget, with that budget and `unit`.
  Raises ValueError for an unknown unit, a budget ≤ 0 or below the all-rank-1 model's
  fraction, naming that fraction.
  """
  if unit not in UNITS:
    raise ValueError(f"flexrank.budget_unit must be one of {UNITS}, got {unit!r}.")
  layers = nsn_layers(model)
  kernels = {
    "/".join(map(str, path)): node.kernel[...]
    for path, node in nnx.iter_graph(dense)
    if isinstance(node, nnx.Linear)
  }
  missing = [path for path in layers if path not in kernels or path not in calibration]
  if missing:
    raise ValueError(f"no dense kernel or calibration inputs for the NSN layers {missing}.")
  tables = {
    path: flexrank.layer_error_table(kernels[path], layer.a[...], layer.b[...], calibration[path])
    for path, layer in layers.items()
  }
  flops_of = lambda ranks: flops.model_flops(model, ranks, seq_len)
  params_of = lambda ranks: flops.active_params(model, ranks)
  dense_flops, dense_params = flops.dense_model_flops(model, seq_len), flops.total_params(dense)
  if unit == "params":  # a rank costs r·(d_in + d_out) parameters: half its FLOPs per row
    tables = {path: [(r, c // 2, e) for r, c, e in table] for path, table in tables.items()}
  cost_of, dense_cost = (flops_of, dense_flops) if unit == "flops" else (params_of, dense_params)
  # What no rank changes (attention, dense layers, embeddings, head, the NSN biases): the whole
  # model at R less the tables' rank-dependent costs, so fixed + Σ table cost = cost_of exactly.
  fixed = cost_of(None) - sum(
    table[layer.max_rank - 1][1] for table, layer in zip(tables.values(), layers.values())
  )
  smallest = (fixed + sum(table[0][1] for table in tables.values())) / dense_cost
  low = [b for b in budgets if not b >= smallest]
  if low:
    raise ValueError(
      f"flexrank.budgets {low} are below {smallest:.4f}, the fraction of the "
      f"dense model's {unit} at rank 1 in every NSN layer."
    )
  nested = flexrank.nested_profiles(tables, [b * dense_cost - fixed for b in budgets])
  results = []
  for budget, ranks in zip(budgets, nested):
    cost = cost_of(ranks)
    if cost > budget * dense_cost:  # the DP's costs and cost_of must agree
      raise RuntimeError(
        f"profile for budget {budget} costs {cost / dense_cost:.6f} of the dense {unit}."
      )
    results.append(
      Profile(
        budget,
        unit,
        ranks,
        flops_of(ranks) / dense_flops,
        params_of(ranks) / dense_params,
        flexrank.profile_cost_error(tables, ranks)[1],
      )
    )
  return results


def by_budget(found: Sequence[Profile | Mapping]) -> dict[float, FrozenDict]:
  """{budget: ranks} of `search_profiles`' profiles or of their JSON records (the metadata's
  copy); each ranks a hashable {path: int}, so it can be a static argument (`RankEvaluator`)."""
  return dict(map(_budget_and_ranks, found))


def saved_profiles(metadata: Mapping) -> dict[float, FrozenDict]:
  """`by_budget` of a checkpoint's metadata. Raises ValueError if it holds no profiles."""
  found = metadata.get("flexrank", {}).get("profiles")
  if not found:
    raise ValueError(
      "this checkpoint holds no FlexRank profiles: train with "
      "--config.flexrank.budgets='(0.3, 0.5, 0.7, 0.9)' to search them."
    )
  return by_budget(found)


def summarise(profile: Mapping[str, int]) -> str:
  """'min–max (mean m)' of a profile's ranks, for tables."""
  ranks = np.asarray(list(profile.values()))
  return f"{ranks.min()}–{ranks.max()} (mean {ranks.mean():.1f})"


@dataclasses.dataclass(frozen=True)
class ProfileSampler:
  """The profile each distillation step trains: k with probability α_k, from an RNG keyed by
  (seed, step), so a resumed run replays the same sequence.

  ranks: int32 (K, L), profile k's rank of layer `paths[l]`. A rank source for the checkpoint
  metadata too: no *global* rank is trained, so every rank 1..max_rank counts as held out.
  """

  budgets: tuple[float, ...]
  paths: tuple[str, ...]
  ranks: np.ndarray
  probabilities: tuple[float, ...]
  seed: int
  max_rank: int

  @classmethod
  def create(
    cls,
    profiles: Sequence[Profile | Mapping],
    probabilities: Sequence[float],
    seed: int,
    max_rank: int,
  ) -> ProfileSampler:
    """From `search_profiles`' profiles or their JSON records; `probabilities` () means uniform.
    Raises ValueError unless there is one probability ≥ 0 per profile and they sum to 1."""
    k = len(profiles)
    probabilities = tuple(probabilities) or (1.0 / k,) * k
    if len(probabilities) != k or min(probabilities) < 0 or not np.isclose(sum(probabilities), 1.0):
      raise ValueError(
        f"flexrank.probabilities {probabilities} must be {k} non-negative numbers "
        "summing to 1, one per budget (or () for uniform)."
      )
    budgets, profile_ranks = zip(*map(_budget_and_ranks, profiles))
    paths = tuple(profile_ranks[0])
    ranks = np.asarray([[p[path] for path in paths] for p in profile_ranks], np.int32)
    return cls(budgets, paths, ranks, probabilities, seed, max_rank)

  def __call__(self, step: int) -> np.ndarray:
    """int32 (L,): the per-layer ranks step `step` trains."""
    return self.ranks[self.index(step)]

  def index(self, step: int) -> int:
    """Which profile step `step` trains."""
    return int(
      np.random.default_rng([self.seed, step]).choice(len(self.budgets), p=self.probabilities)
    )

  def profile(self, ranks) -> dict:
    """ranks (L,), a row of `ranks` (a traced array inside the train step) → {path: scalar}:
    every layer then takes the masked path, one compiled program for every profile."""
    return {path: ranks[i] for i, path in enumerate(self.paths)}

  def trained_ranks(self) -> tuple[int, ...]:
    return ()
