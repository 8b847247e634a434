"""FlexRank: activation-aware factors, exact and nested profile search, GAR deployment, and the
profile records a search returns and a checkpoint stores."""

import itertools
import json

from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from nsn_jax import flexrank, flops
from nsn_jax.layers import nsn_layers, set_submodule, svd_factors
from nsn_jax.models.mlp import NSNMLP
from nsn_jax.profiles import Profile, ProfileSampler, by_budget, saved_profiles, search_profiles

D_IN, D_OUT = 24, 16


def _correlated(seed=0, n=256):
  """Activations with a few dominant directions (low rank plus noise) and a random kernel."""
  rng = np.random.default_rng(seed)
  mix = 3 * rng.normal(size=(4, D_IN))
  mix = np.concatenate([mix, 0.1 * rng.normal(size=(D_IN, D_IN))])
  x = rng.normal(size=(n, mix.shape[0])) @ mix
  return x, rng.normal(size=(D_IN, D_OUT))


def test_activation_aware_beats_svd_at_every_rank():
  x, w = _correlated()
  aa, svd = flexrank.activation_aware_factors(w, x, D_OUT), svd_factors(w, D_OUT)
  errs = [
    (flexrank.output_error(w, *aa, x, r), flexrank.output_error(w, *svd, x, r))
    for r in range(1, D_OUT + 1)
  ]
  assert all(e_aa <= e_svd + 1e-6 for e_aa, e_svd in errs), errs
  assert any(e_aa < 0.8 * e_svd for e_aa, e_svd in errs[:-1]), errs
  assert errs[-1][0] < 1e-4  # full rank reproduces the kernel


@pytest.mark.parametrize("kind", ["few_rows", "duplicated_columns"])
def test_activation_aware_rank_deficient_statistics(kind):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(D_IN, D_OUT))
  if kind == "few_rows":
    x, span = rng.normal(size=(8, D_IN)), 8
  else:
    span = D_IN // 2
    half = rng.normal(size=(64, D_IN // 2))
    x = np.concatenate([half, half], axis=1)
  a, b = flexrank.activation_aware_factors(w, x, 12)
  assert a.shape == (D_IN, 12) and b.shape == (12, D_OUT)
  errs = [flexrank.output_error(w, a, b, x, r) for r in range(1, 13)]
  assert np.all(np.isfinite(errs)) and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  # The rows span only `span` directions, so that rank already fits every calibration row.
  assert errs[span - 1] < 1e-3, errs


def test_error_table_costs_and_monotone_errors():
  x, w = _correlated()
  a, b = flexrank.activation_aware_factors(w, x, 10)
  table = flexrank.layer_error_table(w, a, b, x)
  assert [row[:2] for row in table] == [(r, 2 * r * (D_IN + D_OUT)) for r in range(1, 11)]
  errs = [e for _, _, e in table]
  assert all(e2 <= e1 + 1e-9 for e1, e2 in zip(errs, errs[1:]))
  # The prefix-sum table equals the direct per-rank error, for any factors (SVD ones too).
  for factors in ((a, b), svd_factors(w, 10)):
    table = flexrank.layer_error_table(w, *factors, x)
    direct = [flexrank.output_error(w, *factors, x, r) ** 2 for r in range(1, 11)]
    np.testing.assert_allclose([e for _, _, e in table], direct, rtol=1e-9, atol=1e-12)


@st.composite
def _tables(draw):
  """3 layers, ranks 1..5, strictly increasing integer costs and decreasing errors."""
  tables = {}
  for layer in ("l0", "l1", "l2"):
    steps = draw(st.lists(st.integers(1, 20), min_size=5, max_size=5))
    drops = draw(st.lists(st.floats(0.0, 1.0), min_size=5, max_size=5))
    costs, errs = np.cumsum(steps), 5.0 - np.cumsum(drops)
    tables[layer] = [(r + 1, int(costs[r]), float(errs[r])) for r in range(5)]
  return tables


def _brute_force(tables, budget):
  best = np.inf
  for rows in itertools.product(*tables.values()):
    if sum(c for _, c, _ in rows) <= budget:
      best = min(best, sum(e for _, _, e in rows))
  return best


@settings(max_examples=60, deadline=None)
@given(_tables(), st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5))
def test_profiles_optimal_within_budget_and_nested(tables, fractions):
  low = sum(t[0][1] for t in tables.values())
  high = sum(t[-1][1] for t in tables.values())
  budgets = [low + f * (high - low) for f in fractions]
  nested = flexrank.nested_profiles(tables, budgets)
  for budget, profile in zip(budgets, nested):
    optimum = flexrank.best_profile(tables, budget)
    cost, err = flexrank.profile_cost_error(tables, profile)
    opt_cost, opt_err = flexrank.profile_cost_error(tables, optimum)
    assert cost <= budget and opt_cost <= budget
    assert opt_err == pytest.approx(_brute_force(tables, budget), abs=1e-9)
    assert err >= opt_err - 1e-9
  order = np.argsort(budgets, kind="stable")
  for i, j in zip(order, order[1:]):
    assert all(nested[i][l] <= nested[j][l] for l in tables)
  smallest = order[0]
  assert flexrank.profile_cost_error(tables, nested[smallest])[1] == pytest.approx(
    flexrank.profile_cost_error(tables, flexrank.best_profile(tables, budgets[smallest]))[1]
  )


def test_large_budgets_round_costs_up_and_stay_within_budget():
  # 40 layers of 64 ranks whose costs share no useful unit: the DP coarsens to `max_units`.
  rng = np.random.default_rng(0)
  tables = {
    f"l{i}": [
      (r, 97 * r + int(rng.integers(0, 13)), float(np.exp(-r / 9) + 1e-3 * i)) for r in range(1, 65)
    ]
    for i in range(40)
  }
  budget = 0.4 * sum(t[-1][1] for t in tables.values())
  coarse = flexrank.best_profile(tables, budget, max_units=256)
  fine = flexrank.best_profile(tables, budget)
  cost, err = flexrank.profile_cost_error(tables, coarse)
  assert cost <= budget and flexrank.profile_cost_error(tables, fine)[0] <= budget
  assert err <= 1.05 * flexrank.profile_cost_error(tables, fine)[1]


def test_budget_below_all_rank_one_raises():
  tables = {"l0": [(1, 10, 1.0), (2, 20, 0.5)], "l1": [(1, 6, 1.0), (2, 12, 0.2)]}
  with pytest.raises(ValueError, match="below"):
    flexrank.nested_profiles(tables, [30, 15])
  assert flexrank.nested_profiles(tables, [32, 16, 22]) == [
    {"l0": 2, "l1": 2},
    {"l0": 1, "l1": 1},
    {"l0": 1, "l1": 2},
  ]


@pytest.mark.parametrize("r", [1, 3, 8, 15, 16])
def test_gar_matches_factorised_output(r):
  rng = np.random.default_rng(r)
  a, b = rng.normal(size=(D_IN, D_OUT)), rng.normal(size=(D_OUT, D_OUT))
  x = rng.normal(size=(32, D_IN))
  perm, n, m = flexrank.gar_factors(a, b, r)
  assert sorted(perm) == list(range(D_IN)) and n.shape == (D_IN - r, r) and m.shape == (r, D_OUT)
  assert np.linalg.cond(a[perm[:r], :r]) < 1e6  # cond(G) = cond(A[rows])
  want = x @ a[:, :r] @ b[:r]
  got = np.asarray(flexrank.gar_apply(x, perm, n, m))
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def _searched(budgets=(0.9, 0.5), unit="flops"):
  """Profiles of a small MLP (12 → 10 → 8 → 3, R = 8) against an unrelated dense twin."""
  model = NSNMLP(12, (10, 8), 3, max_rank=8, rngs=nnx.Rngs(0))
  dense = nnx.clone(model)
  for path, layer in nsn_layers(dense).items():
    set_submodule(dense, path, nnx.Linear(layer.in_features, layer.out_features, rngs=nnx.Rngs(1)))
  rng = np.random.default_rng(0)
  calibration = {"hidden/0": rng.normal(size=(64, 12)), "hidden/1": rng.normal(size=(64, 10))}
  return model, search_profiles(model, dense, calibration, budgets, unit=unit)


@pytest.mark.parametrize("unit", ["flops", "params"])
def test_search_returns_profiles_within_budget(unit):
  model, found = _searched(unit=unit)
  assert all(isinstance(p, Profile) and p.unit == unit for p in found)
  assert [p.budget for p in found] == [0.9, 0.5]
  for p in found:
    assert p.flops_frac_dense == flops.model_flops(model, p.ranks) / flops.dense_model_flops(model)
    assert (p.flops_frac_dense if unit == "flops" else p.params_frac_dense) <= p.budget
    assert all(isinstance(r, int) for r in p.ranks.values()) and p.error >= 0
  assert all(found[1].ranks[path] <= found[0].ranks[path] for path in found[0].ranks)  # nested


def test_profile_json_round_trip_and_metadata_readers():
  model, found = _searched()
  records = json.loads(json.dumps([p.to_json() for p in found]))  # what metadata holds
  assert list(records[0]) == [
    "budget",
    "unit",
    "ranks",
    "flops_frac_dense",
    "params_frac_dense",
    "error",
  ]
  assert [Profile.from_json(r) for r in records] == found
  assert len({*found}) == 2  # hashable
  metadata = {"flexrank": {"profiles": records}}
  assert by_budget(found) == by_budget(records) == saved_profiles(metadata)
  assert by_budget(found)[0.5] == found[1].ranks
  # Records written before `unit` and `params_frac_dense` existed still give their ranks.
  old = [{k: r[k] for k in ("budget", "ranks", "flops_frac_dense", "error")} for r in records]
  assert by_budget(old) == by_budget(found)
  with pytest.raises(ValueError, match=r"lacks \['unit', 'params_frac_dense'\]"):
    Profile.from_json(old[0])
  samplers = [ProfileSampler.create(p, (0.25, 0.75), seed=3, max_rank=8) for p in (found, records)]
  assert samplers[0].budgets == samplers[1].budgets == (0.9, 0.5)
  np.testing.assert_array_equal(samplers[0].ranks, samplers[1].ranks)
  assert samplers[0].paths == ("hidden/0", "hidden/1")
