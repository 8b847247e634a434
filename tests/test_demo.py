"""The demo's promises, on the real default config (slow: about a minute; `make test-slow`).

Tolerance for "accuracy is non-decreasing in rank": acc(r') ≥ acc(r) − 0.02 for every r < r'.
Two points is about two binomial standard deviations of a difference on the 1,000 test digits.
"""

import pytest

from nsn_jax import flops
from nsn_jax.restore import restore_model
from nsn_jax.sweep import run_sweep
from nsn_jax.train_lib import train_and_evaluate

MONOTONE_TOLERANCE = 0.02


@pytest.mark.slow
def test_default_config_meets_the_demo_promises(data_dir, tmp_path):
  from configs import default

  config = default.get_config()
  config.data.data_dir = data_dir
  train_and_evaluate(config, str(tmp_path))
  rows = {r.rank: r.accuracy for r in run_sweep(str(tmp_path), "all", verbose=False)}
  max_rank = config.model.max_rank
  assert sorted(rows) == list(range(1, max_rank + 1))
  assert rows[max_rank] >= 0.92
  model, _, _ = restore_model(str(tmp_path))
  half = flops.rank_for_budget(model, 0.5, "max_rank")  # largest rank with ≤ 50% of R's FLOPs
  assert rows[max_rank] - rows[half] <= 0.03
  for r in range(1, max_rank + 1):
    for higher in range(r + 1, max_rank + 1):
      assert rows[higher] >= rows[r] - MONOTONE_TOLERANCE, (r, higher, rows[r], rows[higher])
