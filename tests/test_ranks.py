"""Rank sources: curriculum bounds, held-out ranks, replayable draws."""

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest

from nsn_jax.ranks import AnchorAndVariants, FixedRanks, held_out_ranks


@settings(max_examples=40, deadline=None)
@given(
  curriculum=st.sampled_from(["linear", "step", "none"]),
  seed=st.integers(0, 2**16),
  step=st.integers(0, 999),
  min_rank=st.integers(1, 16),
)
def test_draws_stay_in_range_and_never_hit_held_out(curriculum, seed, step, min_rank):
  source = AnchorAndVariants(
    max_rank=32,
    min_rank=min_rank,
    num_variants=3,
    curriculum=curriculum,
    warmup_fraction=0.5,
    total_steps=1000,
    held_out=(3, 17, 29),
    seed=seed,
  )
  ranks = source(step)
  assert ranks[0] == 32 and ranks.dtype == np.int32
  lo = source.lower_bound(step)
  assert min_rank <= lo <= 32
  for r in ranks[1:]:
    assert lo <= r <= 32 and r not in (3, 17, 29)
  np.testing.assert_array_equal(ranks, source(step))  # same (seed, step) → same draws


def test_curriculum_widens_downward():
  linear = AnchorAndVariants(
    max_rank=64, min_rank=4, curriculum="linear", warmup_fraction=0.5, total_steps=100
  )
  bounds = [linear.lower_bound(t) for t in range(100)]
  assert bounds[0] == 64 and bounds[50] == 4 and bounds[-1] == 4
  assert all(b <= a for a, b in zip(bounds, bounds[1:]))
  step = AnchorAndVariants(
    max_rank=64, min_rank=4, curriculum="step", warmup_fraction=0.5, total_steps=100, num_stages=4
  )
  assert sorted({step.lower_bound(t) for t in range(100)}, reverse=True) == [64, 49, 34, 19, 4]
  none = AnchorAndVariants(max_rank=64, min_rank=4, curriculum="none")
  assert none.lower_bound(0) == 4


def test_draws_differ_across_steps_and_seeds():
  source = AnchorAndVariants(max_rank=64, curriculum="none", seed=1)
  draws = {int(source(t)[1]) for t in range(50)}
  assert len(draws) > 10
  other = AnchorAndVariants(max_rank=64, curriculum="none", seed=2)
  assert [int(source(t)[1]) for t in range(20)] != [int(other(t)[1]) for t in range(20)]


def test_trained_and_held_out_sets():
  source = AnchorAndVariants(max_rank=8, min_rank=2, held_out=(5,))
  assert source.trained_ranks() == (2, 3, 4, 6, 7, 8)
  assert held_out_ranks(source) == (1, 5)
  assert held_out_ranks(FixedRanks((8, 4, 2), 8)) == (1, 3, 5, 6, 7)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(held_out=(8,)), "anchor"),
    (dict(held_out=(9,)), "outside"),
    (dict(curriculum="cosine"), "curriculum"),
    (dict(min_rank=0), "outside"),
  ],
)
def test_bad_rank_sources_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    AnchorAndVariants(max_rank=8, **kwargs)
  with pytest.raises(ValueError, match="outside"):
    FixedRanks((8, 9), 8)
