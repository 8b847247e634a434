"""FLOPs/params accounting against XLA's own count, the forms' formulas, and the budget solver."""

import os
import subprocess
import sys

from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import pytest

from nsn_jax import flops
from nsn_jax.models.mlp import NSNMLP

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA also counts one FLOP per ReLU output, which the analytic count leaves out; after adding
# those, the counts must agree to rounding.
XLA_TOLERANCE = 1e-3


def _mlp(hidden=(64, 48), max_rank=16):
  return NSNMLP(100, hidden, 10, max_rank=max_rank, rngs=nnx.Rngs(0))


def test_analytic_flops_match_xla_per_rank():
  model = _mlp()
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x, r: nnx.merge(graphdef, s)(x, rank=r), static_argnums=2)
  batch = 32
  x = jnp.ones((batch, 100))
  for r in (1, 2, 5, 8, 16):
    xla = forward.lower(state, x, r).compile().cost_analysis()["flops"]
    analytic = batch * flops.model_flops(model, r)
    relus = batch * (64 + 48)
    # At rank 1 the second matmul of each NSN layer contracts over size 1: XLA makes it an outer
    # product and counts one FLOP per output (d_out per row) instead of two.
    outer_product_saving = batch * (64 + 48) if r == 1 else 0
    assert abs(xla - analytic - relus + outer_product_saving) / analytic <= XLA_TOLERANCE, (
      r,
      xla,
      analytic,
    )


def test_counts_by_hand():
  model = _mlp(hidden=(64,), max_rank=16)
  # NSN 100→64 at rank 4: 2·4·164 + 64; head 64→10: 2·640 + 10.
  assert flops.model_flops(model, 4) == 2 * 4 * 164 + 64 + 2 * 640 + 10
  assert flops.dense_model_flops(model) == 2 * 6400 + 64 + 2 * 640 + 10
  assert flops.total_params(model) == 16 * 164 + 64 + 640 + 10
  assert flops.active_params(model, 4) == 4 * 164 + 64 + 640 + 10
  assert flops.break_even_rank(100, 64) == pytest.approx(6400 / 164)


@settings(max_examples=30, deadline=None)
@given(budget=st.floats(0.01, 1.5), relative_to=st.sampled_from(["max_rank", "dense"]))
def test_budget_solver_returns_largest_feasible_rank(budget, relative_to):
  model = _mlp()
  costs = [flops.model_flops(model, r) for r in range(1, 17)]
  assert all(b > a for a, b in zip(costs, costs[1:]))  # FLOPs strictly monotone in rank
  reference = costs[-1] if relative_to == "max_rank" else flops.dense_model_flops(model)
  feasible = [r for r, c in zip(range(1, 17), costs) if c <= budget * reference]
  if not feasible:
    with pytest.raises(ValueError, match="below the cost of rank 1"):
      flops.rank_for_budget(model, budget, relative_to)
  else:
    assert flops.rank_for_budget(model, budget, relative_to) == max(feasible)


def test_bad_budget_and_rank_errors():
  model = _mlp()
  with pytest.raises(ValueError, match="positive"):
    flops.rank_for_budget(model, 0.0)
  with pytest.raises(ValueError, match="R=16"):
    flops.model_flops(model, 17)


def test_form_flops_by_hand():
  # 10 → 6 at rank 2: dense 2·60, factorised 2·2·16, GAR 2·2·(16 − 2); a bias adds 6.
  assert [flops.form_flops(form, 10, 6, 2) for form in flops.FORMS] == [126, 70, 62]
  assert flops.form_flops("gar", 10, 6, 2, use_bias=False) == 56
  assert flops.dense_flops(10, 6, use_bias=False) == 120
  with pytest.raises(ValueError, match="form must be one of"):
    flops.form_flops("folded", 10, 6, 2)


@pytest.mark.parametrize("d_in,d_out", [(24, 16), (16, 24), (7, 7)])
def test_cheapest_form(d_in, d_out):
  top = min(d_in, d_out)
  for r in range(1, top + 1):
    cost = {form: flops.form_flops(form, d_in, d_out, r) for form in flops.FORMS}
    assert cost["gar"] <= cost["factorised"]
    assert cost["gar"] < cost["dense"] if r < top else cost["gar"] == cost["dense"]
    assert flops.cheapest_form(d_in, d_out, r) == ("gar" if r < top else "dense")
    # Without GAR: factorised strictly below the break-even rank, dense from it (ties included).
    assert flops.cheapest_form(d_in, d_out, r, ("dense", "factorised")) == (
      "factorised" if r < flops.break_even_rank(d_in, d_out) else "dense"
    )


def test_importing_flops_leaves_the_deployed_modules_out():
  code = "import sys, nsn_jax.flops; print('nsn_jax.deploy' in sys.modules)"
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "False"
