"""Analysis metrics on constructed cases where the answer is known."""

from flax import nnx
import jax
import numpy as np
import pytest

from nsn_jax import analysis
from nsn_jax.layers import NSNDense


def test_energy_profile_of_svd_init_is_the_spectrum():
  kernel = jax.random.normal(jax.random.key(0), (20, 12))
  layer = NSNDense.from_dense(kernel, None, 12)
  np.testing.assert_allclose(
    analysis.energy_profile(layer), np.linalg.svd(np.asarray(kernel), compute_uv=False), rtol=1e-4
  )


def test_containment_is_one_for_svd_and_lower_for_reversed_components():
  kernel = np.asarray(jax.random.normal(jax.random.key(0), (20, 12)))
  layer = NSNDense.from_dense(kernel, None, 12)
  assert analysis.containment_score(layer, 3, 9) == pytest.approx(1.0, abs=1e-6)
  # Put the weakest components first: the rank-3 model is no longer the dominant part.
  layer.a[...] = layer.a[...][:, ::-1]
  layer.b[...] = layer.b[...][::-1]
  assert analysis.containment_score(layer, 3, 9) < 0.5
  with pytest.raises(ValueError):
    analysis.containment_score(layer, 5, 5)


def test_inter_layer_similarity_bounds():
  rngs = nnx.Rngs(0)
  writer = NSNDense(10, 32, 4, rngs=rngs)
  reader = NSNDense(32, 6, 4, rngs=rngs)
  random_pair = analysis.inter_layer_similarity(writer, reader, 4)
  assert 0.0 <= random_pair < 0.6
  # A reader whose input subspace is the writer's output subspace scores 1.
  reader.a[...] = writer.b[...].T
  assert analysis.inter_layer_similarity(writer, reader, 4) == pytest.approx(1.0, abs=1e-5)
  with pytest.raises(ValueError, match="consecutive"):
    analysis.inter_layer_similarity(reader, writer, 4)
