"""`digits`: scikit-learn's 1,797 real 8×8 handwritten digits, built in (`data.name = "digits"`).

Provenance: `sklearn.datasets.load_digits`, read from `sklearn/datasets/data/digits.csv.gz`
inside the scikit-learn wheel (a copy of the test set of UCI's "Optical Recognition of
Handwritten Digits"); nothing is downloaded. Each pixel counts the set bits (0..16) of one 4×4
block of a 32×32 bitmap; classes 0..9 hold 174 to 183 digits each.

Split: stratified with a fixed numpy seed (0), `test` = 36 digits per class (360) and `train` =
the other 1,437; every digit is in exactly one split. Images are stored as uint8 (N, 8, 8, 1),
round(pixel · 255 / 16), so the pipeline gives the model float32 (8, 8, 1) in [0, 1], as for
mnist5k; labels are int64 (N,).

The splits are written once, in the arrays format (`nsn_jax.data.arrays`), to
`DATA_DIR/digits/digits-<VERSION>.npz` (DATA_DIR: `data.data_dir`, else TFDS's default), and
read from there as `npz:` datasets are.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from nsn_jax.data import arrays

NAME = "digits"
VERSION = "1.0.0"  # of the split and scaling below; a change writes a new file
IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
SPLITS = ("train", "test")
_TEST_PER_CLASS = 36
_SPLIT_SEED = 0
_MAX_PIXEL = 16


def splits() -> dict[str, dict[str, np.ndarray]]:
  """{"train" | "test": {"image": uint8 (N, 8, 8, 1) in 0..255, "label": int64 (N,) in 0..9}}.
  Raises FileNotFoundError naming `make setup` when scikit-learn is not installed."""
  try:
    from sklearn.datasets import load_digits
  except ImportError as e:
    raise FileNotFoundError(
      "data.name=digits is built from the digits bundled with scikit-learn, which is not "
      "installed in this environment. Run `make setup`."
    ) from e
  digits = load_digits()
  images = np.rint(digits.images * (255 / _MAX_PIXEL)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  rows = arrays.stratified_split(labels, _TEST_PER_CLASS, _SPLIT_SEED)
  return {split: {"image": images[r], "label": labels[r]} for split, r in rows.items()}


def prepare(data_dir: str) -> str:
  """Path of the digits' .npz under `data_dir`, written on first use. The write is atomic, so
  processes preparing it at once each leave the same complete file."""
  path = os.path.join(os.path.expanduser(data_dir), NAME, f"{NAME}-{VERSION}.npz")
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, partial = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(path))
  os.close(fd)
  try:
    arrays.save_arrays(partial, **splits())
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)
  return path
