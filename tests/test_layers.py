"""NSNDense: static vs masked paths, SVD init, rank errors, one compile per rank, profiles."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsn_jax.layers import NSNDense, NSNFactor, WidthRank, name_nsn_layers, svd_factors
from nsn_jax.models.mlp import NSNMLP

D_IN, D_OUT, R = 12, 10, 8


def _layer(seed=0, **kw):
  return NSNDense(D_IN, D_OUT, R, rngs=nnx.Rngs(seed), **kw)


def _rel_err(x, y):
  return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


def test_static_and_masked_paths_agree_at_every_rank():
  layer = _layer()
  layer.bias[...] = jax.random.normal(jax.random.key(3), (D_OUT,))
  x = jax.random.normal(jax.random.key(1), (5, D_IN))
  for r in range(1, R + 1):
    assert _rel_err(layer(x, rank=jnp.int32(r)), layer(x, rank=r)) <= 1e-5, r


def test_width_rank_slices_to_its_width_then_masks():
  """WidthRank(w, r) (a bucket's rank): the static rank r for every r ≤ w, clamped to [1, w]."""
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (5, D_IN))
  for width in (3, R):
    for r in range(1, width + 1):
      assert _rel_err(layer(x, rank=WidthRank(width, jnp.int32(r))), layer(x, rank=r)) <= 1e-5
  assert _rel_err(layer(x, rank=WidthRank(3, jnp.int32(7))), layer(x, rank=3)) <= 1e-5
  with pytest.raises(ValueError, match=rf"R={R}"):
    layer(x, rank=WidthRank(R + 1, jnp.int32(1)))
  with pytest.raises(ValueError, match="integer"):
    layer(x, rank=WidthRank(3, jnp.float32(2)))


def test_static_slice_matches_materialised_kernel():
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (5, D_IN))
  for r in (1, 4, R):
    np.testing.assert_allclose(layer(x, rank=r), x @ layer.kernel(r), rtol=1e-5, atol=1e-6)


def test_none_means_max_rank_and_switching_rank_changes_output():
  layer = _layer()
  x = jax.random.normal(jax.random.key(1), (5, D_IN))
  np.testing.assert_array_equal(layer(x), layer(x, rank=R))
  outputs = [layer(x, rank=r) for r in range(1, R + 1)]
  for lo, hi in zip(outputs[:-1], outputs[1:]):
    assert not np.allclose(lo, hi)


@pytest.mark.parametrize("bad", [0, R + 1, -1, 2.5, "8", True, np.float32(3.0)])
def test_bad_static_rank_is_a_clear_error(bad):
  layer = _layer()
  with pytest.raises(ValueError, match=rf"R={R}"):
    layer(jnp.ones((2, D_IN)), rank=bad)


def test_traced_rank_is_clamped():
  layer = _layer()
  x = jnp.ones((2, D_IN))
  np.testing.assert_allclose(layer(x, rank=jnp.int32(R + 5)), layer(x, rank=R), rtol=1e-5)
  np.testing.assert_allclose(layer(x, rank=jnp.int32(0)), layer(x, rank=1), rtol=1e-5)
  with pytest.raises(ValueError, match="integer"):
    layer(x, rank=jnp.float32(2.0))


def test_svd_init_reproduces_dense_and_error_is_non_increasing():
  key_w, key_b = jax.random.split(jax.random.key(0))
  kernel = jax.random.normal(key_w, (D_IN, D_OUT))
  bias = jax.random.normal(key_b, (D_OUT,))
  layer = NSNDense.from_dense(kernel, bias, max_rank=100)
  assert layer.max_rank == min(D_IN, D_OUT)  # truncated to min(R, d_in, d_out)
  x = jax.random.normal(jax.random.key(1), (7, D_IN))
  assert _rel_err(layer(x), x @ kernel + bias) <= 1e-5
  errors = [float(jnp.linalg.norm(layer.kernel(r) - kernel)) for r in range(1, layer.max_rank + 1)]
  assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:]))
  assert errors[-1] <= 1e-4 * errors[0]


def test_svd_split_energy_equals_singular_values():
  kernel = jax.random.normal(jax.random.key(0), (D_IN, D_OUT))
  a, b = svd_factors(kernel, R)
  sigma = jnp.linalg.svd(kernel, compute_uv=False)[:R]
  np.testing.assert_allclose(
    jnp.linalg.norm(a, axis=0) * jnp.linalg.norm(b, axis=1), sigma, rtol=1e-5
  )


def test_each_static_rank_compiles_exactly_once():
  layer = _layer()
  graphdef, state = nnx.split(layer)

  @chex.assert_max_traces(n=3)
  def forward(state, x, rank):
    return nnx.merge(graphdef, state)(x, rank=rank)

  jitted = jax.jit(forward, static_argnums=2)
  x = jnp.ones((2, D_IN))
  for _ in range(3):
    for r in (1, 4, R):
      jitted(state, x, r)
  chex.clear_trace_counter()


def test_lower_rank_compiles_to_fewer_flops():
  layer = _layer()
  graphdef, state = nnx.split(layer)
  forward = jax.jit(lambda s, x, r: nnx.merge(graphdef, s)(x, rank=r), static_argnums=2)
  x = jnp.ones((64, D_IN))
  flops = [forward.lower(state, x, r).compile().cost_analysis()["flops"] for r in (1, 4, R)]
  assert flops[0] < flops[1] < flops[2]


def test_factors_have_their_own_variable_type_and_dtypes():
  layer = _layer(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  factors = nnx.state(layer, NSNFactor)
  assert set(factors.keys()) == {"a", "b"}
  assert layer.a[...].dtype == jnp.bfloat16
  assert layer(jnp.ones((2, D_IN)), rank=3).dtype == jnp.bfloat16
  assert _layer(dtype=jnp.bfloat16)(jnp.ones((2, D_IN))).dtype == jnp.bfloat16


def test_profile_routes_a_rank_per_layer_path():
  model = NSNMLP(6, (8, 8), 3, max_rank=4, rngs=nnx.Rngs(0))
  layers = name_nsn_layers(model)
  assert list(layers) == ["hidden/0", "hidden/1"]
  x = jax.random.normal(jax.random.key(0), (2, 6))
  profile = {"hidden/0": 2, "hidden/1": 3}
  manual = model.head(jax.nn.relu(model.hidden[1](jax.nn.relu(model.hidden[0](x, 2)), 3)))
  np.testing.assert_allclose(model(x, rank=profile), manual, rtol=1e-6)
  traced = {k: jnp.int32(v) for k, v in profile.items()}
  np.testing.assert_allclose(model(x, rank=traced), manual, rtol=1e-5)
  with pytest.raises(ValueError, match="hidden/1"):
    model(x, rank={"hidden/0": 2})


def test_scratch_init_keeps_low_ranks_well_scaled():
  layer = NSNDense(256, 256, 64, use_bias=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2048, 256))
  full = float(jnp.var(layer(x)))
  assert 0.8 < full < 1.25  # LeCun-like at full rank
  assert float(jnp.var(layer(x, rank=1))) / full > 0.1  # uniform scales would give 1/64
