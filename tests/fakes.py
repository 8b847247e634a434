"""Stand-ins for datasets that need a network: built locally, read through the real code path."""

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from tensorflow_datasets.text import glue


class FakeCifar10(tfds.image_classification.Cifar10, skip_registration=True):
  """TFDS's real cifar10 features and name with a few random images: what a user who prepared
  cifar10 on a machine with network has on disk (Image features stored as PNG)."""

  name = "cifar10"
  SIZES = {"train": 40, "test": 20}

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.SIZES}

  def _generate_examples(self, split):
    for i, (image, label) in enumerate(zip(*fake_cifar(split))):
      # A PIL image is PNG-encoded by PIL; a numpy one would need TensorFlow.
      yield i, {"id": f"{split}_{i:05d}", "image": PIL.Image.fromarray(image), "label": label}


def fake_cifar(split):
  """The split's uint8 (N, 32, 32, 3) images and int labels, 10 classes."""
  n = FakeCifar10.SIZES[split]
  rng = np.random.default_rng(len(split))
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), [i % 10 for i in range(n)]


class FakeMnli(glue.Glue, skip_registration=True):
  """TFDS's real glue/mnli features (premise, hypothesis, 3-way label) with a few made-up pairs:
  what a user who prepared glue/mnli elsewhere has on disk."""

  name = "glue"
  SIZES = {"train": 24, "validation_matched": 8}

  def __init__(self, **kwargs):
    super().__init__(config="mnli", **kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self.SIZES}

  def _generate_examples(self, split):
    for i in range(self.SIZES[split]):
      yield (
        i,
        {
          "premise": f"the cat sat on mat number {i}.",
          "hypothesis": f"a cat sat {i}.",
          "label": i % 3,
          "idx": i,
        },
      )


class FakeGcs:
  """gs://BUCKET/... mapped onto `root`/BUCKET/... for everything nsn_jax reads and writes
  through etils.epath, the path abstraction orbax uses too. Orbax's array files go through
  TensorStore's own GCS driver, which no local stand-in serves, so the orbax manager alone is
  handed the local twin of its directory: every other path operation sees `gs://`."""

  def __init__(self, root, monkeypatch):
    from etils.epath import testing
    import orbax.checkpoint as ocp

    self.root = str(root)
    one = lambda fn, path, *args, **kwargs: fn(self.local(path), *args, **kwargs)
    two = lambda fn, path, dst, *args, **kwargs: fn(
      self.local(path), self.local(dst), *args, **kwargs
    )
    names = ("exists", "glob", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree")
    self._mock = testing.mock_epath(
      **dict.fromkeys((*names, "stat", "walk"), one), copy=two, rename=two, replace=two
    )
    manager = ocp.CheckpointManager
    monkeypatch.setattr(
      ocp, "CheckpointManager", lambda directory, *a, **k: manager(self.local(directory), *a, **k)
    )

  def local(self, path) -> str:
    path = str(path)
    return f"{self.root}/{path.removeprefix('gs://')}" if path.startswith("gs://") else path

  def __enter__(self):
    self._mock.__enter__()
    return self

  def __exit__(self, *exc):
    return self._mock.__exit__(*exc)
