"""Your own arrays as a dataset: one `.npz` file, `data.name = "npz:PATH"`.

  from nsn_jax.data import save_arrays
  save_arrays("runs/digits.npz", train={"image": x_train, "label": y_train},
              test={"image": x_test, "label": y_test})
  python train.py --config=configs/default.py --workdir=runs/digits \\
      --config.data.name=npz:runs/digits.npz --config.data.image_shape="(8, 8, 1)"

A split holds `image` (uint8 (N, H, W, C), 0..255) or `text` (strings), and `label` (integers
0..num_classes-1; optional for language modelling). The file is read through the same record
interface as a TFDS source, so shuffling, per-host rows, caching and evaluation work unchanged.
"""

from __future__ import annotations

import os

import numpy as np

PREFIX = "npz:"
FEATURES = ("image", "text", "label")


def save_arrays(path: str | os.PathLike, **splits: dict[str, np.ndarray]) -> str:
  """Writes `splits` ({split: {feature: array}}) to the .npz file `path` for
  `data.name = "npz:" + path`; returns that name. Raises ValueError naming the split and the
  feature when a split is empty, mixes lengths, or holds a feature of the wrong kind."""
  arrays = {}
  for split, features in splits.items():
    _check_split(split, {k: np.asarray(v) for k, v in features.items()})
    for feature, values in features.items():
      values = np.asarray(values)
      arrays[f"{split}/{feature}"] = values.astype(str) if feature == "text" else values
  if not arrays:
    raise ValueError(
      "save_arrays: give at least one split, e.g. train={'image': ..., 'label': ...}"
    )
  path = os.fspath(path)
  np.savez(path, **arrays)
  return PREFIX + (path if path.endswith(".npz") else path + ".npz")


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> dict[str, np.ndarray]:
  """Row indices per split of `labels` (int (N,), classes 0..C-1): `test_per_class` rows of each
  class, drawn with numpy seed `seed`, to "test", the rest to "train"; each sorted."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in range(int(labels.max()) + 1):
    rows = rng.permutation(np.flatnonzero(labels == c))
    test.append(rows[:test_per_class])
    train.append(rows[test_per_class:])
  return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


def _check_split(split: str, features: dict[str, np.ndarray]) -> None:
  unknown = sorted(set(features) - set(FEATURES))
  inputs = [k for k in ("image", "text") if k in features]
  if unknown or len(inputs) != 1:
    raise ValueError(
      f"split {split!r} has features {sorted(features)}; valid: one of image or text, and an "
      "optional label"
    )
  lengths = {k: len(v) for k, v in features.items()}
  if len(set(lengths.values())) != 1 or not next(iter(lengths.values())):
    raise ValueError(f"split {split!r}: features of lengths {lengths}; valid: one length ≥ 1")
  image = features.get("image")
  if image is not None and (image.dtype != np.uint8 or image.ndim != 4):
    raise ValueError(
      f"split {split!r}: image is {image.dtype} {image.shape}; valid: uint8 (N, H, W, C), 0..255"
    )
  label = features.get("label")
  if label is not None and (not np.issubdtype(label.dtype, np.integer) or label.min() < 0):
    raise ValueError(f"split {split!r}: label is {label.dtype}; valid: integers ≥ 0")


class ArraySource:
  """One split of an .npz file with the TFDS random-access interface the pipeline reads:
  `len(src)`, `src[i]` and `src.__getitems__(indices)` → record dicts."""

  def __init__(self, path: str, split: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"data.name={PREFIX}{path}: no such file (write it with save_arrays)")
    with np.load(path, allow_pickle=False) as file:
      found = {key.split("/", 1)[0] for key in file.files}
      if split not in found:
        raise ValueError(
          f"data.name={PREFIX}{path}: no split {split!r}; valid: one of {sorted(found)}"
        )
      self.features = {
        key.split("/", 1)[1]: file[key] for key in file.files if key.startswith(split + "/")
      }
    _check_split(split, self.features)
    self.path, self.split = path, split

  def __len__(self) -> int:
    return len(next(iter(self.features.values())))

  def __getitem__(self, index: int) -> dict:
    return self.__getitems__([index])[0]

  def __getitems__(self, indices) -> list[dict]:
    picked = {k: v[np.asarray(indices, np.int64)] for k, v in self.features.items()}
    records = []
    for i in range(len(indices)):
      record = {k: v[i] for k, v in picked.items()}
      if "text" in record:
        record["text"] = str(record["text"]).encode()
      if "label" in record:
        record["label"] = int(record["label"])
      records.append(record)
    return records

  def check(self, image_shape, num_classes, text_feature) -> None:
    """Raises ValueError naming the config field that disagrees with the arrays."""
    name = f"{PREFIX}{self.path}"
    image = self.features.get("image")
    keys = (text_feature,) if isinstance(text_feature, str) else tuple(text_feature or ())
    if keys != (("text",) if "text" in self.features else ()):
      holds = "text under 'text'" if "text" in self.features else "images"
      raise ValueError(f"data.text_feature={text_feature!r}: {name} holds {holds}")
    if image is not None and tuple(image.shape[1:]) != tuple(image_shape):
      raise ValueError(
        f"data.image_shape={tuple(image_shape)}: {name} holds images of {tuple(image.shape[1:])}"
      )
    label = self.features.get("label")
    if num_classes is not None:
      if label is None:
        raise ValueError(f"data.num_classes={num_classes}: {name} has no label in {self.split}")
      if label.max() >= num_classes:
        raise ValueError(
          f"data.num_classes={num_classes}: {name} has label {int(label.max())} in {self.split}"
        )
