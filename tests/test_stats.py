"""Bootstrap intervals of the studies (nsn_jax.studies.stats) and the per-example scores they
resample (RankEvaluator(per_row=True))."""

from flax import nnx
import numpy as np
import pytest

from nsn_jax.studies import stats


def _rows(correct, weight=None) -> dict:
  correct = np.asarray(correct, np.float64)
  weight = np.ones_like(correct) if weight is None else np.asarray(weight, np.float64)
  return {"loss": 2.0 * weight - correct, "correct": correct, "weight": weight}


def test_metrics_weigh_examples_by_their_token_counts():
  rows = _rows([1.0, 3.0], weight=[1.0, 3.0])
  assert stats.metric(rows, "accuracy") == pytest.approx(1.0)
  assert stats.metric(rows, "loss") == pytest.approx((8.0 - 4.0) / 4.0)
  idx = np.array([[0, 0], [1, 1]])  # two resamples: only the first, only the second
  np.testing.assert_allclose(stats.metric(rows, "accuracy", idx), [1.0, 1.0])


def test_a_paired_interval_is_narrower_than_the_unpaired_noise_and_holds_the_truth():
  """Two models that agree on most examples: the paired difference's interval is tight around
  the true difference even though each accuracy alone varies by several points."""
  rng = np.random.default_rng(0)
  a = (rng.random(1000) < 0.6).astype(float)
  b = a.copy()
  b[rng.choice(1000, 30, replace=False)] = 0.0  # b loses up to 30 of a's examples
  result = stats.paired(_rows(a), _rows(b), "accuracy", stats.draws(1000))
  lo, hi = result["diff_ci"]
  assert lo <= result["diff"] <= hi and lo > 0
  assert hi - lo < (result["a_ci"][1] - result["a_ci"][0]) / 2
  assert result["diff"] == pytest.approx(result["a"] - result["b"])


def test_seed_mean_gap_carries_the_seeds_spread():
  """Identical per-example gaps on every seed give an interval from example noise alone; seeds
  that disagree widen it (the interval resamples seeds too)."""
  rng = np.random.default_rng(1)
  dense = (rng.random(500) < 0.7).astype(float)
  nested = [dense.copy() for _ in range(3)]
  for seed, lost in enumerate((5, 60, 120)):
    nested[seed][np.flatnonzero(dense)[:lost]] = 0.0
  idx = stats.draws(500)
  same = stats.seed_mean_gap([(_rows(dense), _rows(nested[1]))] * 3, "accuracy", idx)
  spread = stats.seed_mean_gap([(_rows(dense), _rows(n)) for n in nested], "accuracy", idx)
  assert spread["diff"] == pytest.approx((5 + 60 + 120) / 3 / 500)
  assert spread["seeds"] == 3
  width = lambda r: r["diff_ci"][1] - r["diff_ci"][0]
  assert width(spread) > 2 * width(same)


@pytest.mark.parametrize(
  ("ci", "word"),
  [((1.0, 4.0), "beaten"), ((5.5, 9.0), "not matched"), ((-4.9, 8.9), "not resolved")],
)
def test_verdict_against_the_papers_gap(ci, word):
  assert stats.verdict(ci, 5.0).startswith(word + ":")


def test_per_row_evaluation_keeps_every_example_and_drops_the_padding():
  """7 examples in batches of 4: 'rows' holds exactly the 7 examples' sums (the padded row of
  the last batch is gone), and they add up to the reported metrics."""
  from nsn_jax.evaluate import RankEvaluator
  from nsn_jax.models.mlp import NSNMLP
  from nsn_jax.tasks import get_task

  model = NSNMLP(12, (16,), 3, 4, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  arrays = {
    "image": rng.normal(size=(7, 12)).astype(np.float32),
    "label": rng.integers(0, 3, 7).astype(np.int32),
  }
  task = get_task("image_classification")
  graphdef, params = nnx.split(model)
  plain = RankEvaluator(graphdef, 4, task)(params, arrays, 2)
  kept = RankEvaluator(graphdef, 4, task, per_row=True)(params, arrays, 2)
  rows = kept["rows"]
  assert {k: v.shape for k, v in rows.items()} == dict.fromkeys(("loss", "correct", "weight"), (7,))
  np.testing.assert_array_equal(rows["weight"], np.ones(7))
  assert (
    kept["accuracy"] == pytest.approx(rows["correct"].mean()) == pytest.approx(plain["accuracy"])
  )
  assert kept["loss"] == pytest.approx(rows["loss"].mean(), rel=1e-6)
  assert kept["loss"] == pytest.approx(plain["loss"], rel=1e-6)
  assert "rows" not in plain
