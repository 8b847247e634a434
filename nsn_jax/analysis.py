"""What a trained nested model looks like inside: energy, containment, learned weights, similarity.

All functions take concrete (not traced) parameters and return numpy arrays or floats.
"""

from __future__ import annotations

from flax import nnx
import numpy as np

from nsn_jax.layers import NSNDense, nsn_layers
from nsn_jax.objective import RankWeights


def energy_profile(layer: NSNDense) -> np.ndarray:
  """e_i = ‖a_i‖·‖b_i‖ for components i = 1..R, (R,): a_i the i-th column of a, b_i the i-th row.

  After SVD init e_i = σ_i. A decaying profile means low ranks already hold most of the map.
  """
  a, b = np.asarray(layer.a[...], np.float64), np.asarray(layer.b[...], np.float64)
  return np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=1)


def model_energy_profiles(model: nnx.Module) -> dict[str, np.ndarray]:
  """`energy_profile` of every NSN layer, keyed by layer path."""
  return {path: energy_profile(layer) for path, layer in nsn_layers(model).items()}


def _top_subspace(matrix: np.ndarray, dim: int, side: str) -> np.ndarray:
  """Orthonormal basis (n, dim) of the top-`dim` left ("out") or right ("in") singular space."""
  u, _, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  return u[:, :dim] if side == "in" else vt[:dim].T


def subspace_overlap(basis: np.ndarray, other: np.ndarray) -> float:
  """‖Pᵀ Q‖_F² / dim(P) for orthonormal bases P (n, p), Q (n, q): mean cos² of principal angles.

  1 = span(P) lies inside span(Q); 0 = orthogonal.
  """
  return float(np.sum((basis.T @ other) ** 2) / basis.shape[1])


def containment_score(layer: NSNDense, rank: int, larger_rank: int) -> float:
  """How much of the rank-r map lies in the *principal* rank-r subspace of the rank-r' map.

  With kernels W_r = a[:, :r] b[:r] (d_in × d_out, Flax layout), let U_r be an orthonormal basis
  of W_r's output space (its top-r right singular vectors) and V the top-r output subspace of
  W_{r'}, r < r'. Score = ‖Vᵀ U_r‖_F² / r ∈ [0, 1]: 1 when the small model is exactly the
  dominant part of the larger one. (Plain containment in the *whole* image of W_{r'} is 1 by
  construction for any nested factorisation, so it would carry no information.)
  """
  if not 1 <= rank < larger_rank <= layer.max_rank:
    raise ValueError(
      f"need 1 <= rank < larger_rank <= {layer.max_rank}, got {rank}, {larger_rank}."
    )
  small = _top_subspace(layer.kernel(rank), rank, "out")
  large = _top_subspace(layer.kernel(larger_rank), rank, "out")
  return subspace_overlap(small, large)


def log_variance_per_rank(rank_weights: RankWeights) -> np.ndarray:
  """The learned s_r for r = 1..R, (R,). Lower s = the rank's loss weighs more."""
  return np.asarray(rank_weights.log_var[...])


def inter_layer_similarity(writer: NSNDense, reader: NSNDense, rank: int) -> float:
  """Alignment between what one layer writes and what the next reads, at `rank`.

  For consecutive layers (writer.d_out == reader.d_in): the overlap (see `subspace_overlap`)
  of the writer's rank-r output subspace with the top-r input subspace of the reader's W_r.
  1 = the reader listens exactly where the writer speaks; a random pair scores about r/d.
  """
  if writer.out_features != reader.in_features:
    raise ValueError(
      f"layers {writer.path!r} → {reader.path!r} are not consecutive: "
      f"{writer.out_features} != {reader.in_features}."
    )
  written = _top_subspace(writer.kernel(rank), rank, "out")
  read = _top_subspace(reader.kernel(rank), rank, "in")
  return subspace_overlap(written, read)
