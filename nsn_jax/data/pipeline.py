"""Input pipeline: TFDS random-access sources read with grain, no TensorFlow.

`train_batches(...)[step]` is the host-local batch of global step `step`, a pure function of
(dataset, seed, step, process): a run resumed at step s reads exactly the batch the uninterrupted
run read, with no iterator state to checkpoint. `load_split` reads a whole split for evaluation.

Datasets: `mnist5k` (ships with the code, prepared on first use) or any TFDS dataset already
prepared in `array_record` format under `data_config.data_dir`; nothing is downloaded.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from nsn_jax.data import mnist5k  # Registers the `mnist5k` builder with TFDS.

Batch = dict[str, np.ndarray]

# Reading is cheap next to a training step, and the machines have 2 cores: a few threads and a
# few batches of look-ahead hide the read latency without competing with XLA for the CPU.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class DatasetNotFoundError(ValueError):
  """The dataset or split is not prepared in the data_dir, and nothing may be downloaded."""


def _not_found(name: str, data_dir: str, reason: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(
      f"TFDS dataset {name!r} cannot be read from data_dir {data_dir}: {reason}\n"
      "Nothing is downloaded at run time. On a machine with network access run\n"
      f"  tfds.builder({name!r}, data_dir=DIR).download_and_prepare(file_format='array_record')\n"
      "then copy DIR to this machine and set data_dir (or TFDS_DATA_DIR) to it.")


def data_source(data_config: ml_collections.ConfigDict, split: str) -> Any:
  """Random-access TFDS source of `split`: `len(src)`, `src[i]` and `src.__getitems__(keys)`.

  Records are dicts of numpy values ({"image": uint8 (H, W, C), "label": int, ...}), decoded
  without TensorFlow (Image features through PIL). Raises DatasetNotFoundError when the dataset
  or split is not prepared, ValueError when its features do not match `data_config`.
  """
  name, data_dir = data_config.name, data_config.data_dir
  searched = data_dir or f"{tfds.core.constants.DATA_DIR} (the TFDS default)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _not_found(name, searched, "no such TFDS builder, and none prepared there.") from e
  if name == mnist5k.Mnist5k.name and not builder.is_prepared():
    # Built from files installed with the code: preparing needs no network.
    try:
      builder.download_and_prepare()
    except FileExistsError:
      # Processes sharing a data_dir race to prepare it; the first to finish wins and the
      # others' identical copies are dropped.
      pass
    builder = tfds.builder(name, data_dir=data_dir)  # Reads the info of the prepared files.
  if not builder.is_prepared():
    raise _not_found(name, searched, f"it is not prepared (no {builder.data_dir}).")
  try:
    source = builder.as_data_source(split=split)
  except (ValueError, NotImplementedError) as e:
    # TFDS raises these for an unknown split and for files without random access (tfrecord).
    raise _not_found(name, searched, str(e)) from e
  _check_features(data_config, source.dataset_info.features)
  return source


def _check_features(data_config: ml_collections.ConfigDict, features: Any) -> None:
  """Fails early when the config's image shape or class count disagrees with the dataset's."""
  image_shape = tuple(features["image"].shape)
  num_classes = features["label"].num_classes
  if (image_shape, num_classes) != (tuple(data_config.image_shape), data_config.num_classes):
    raise ValueError(
        f"data config for {data_config.name!r} says image_shape={tuple(data_config.image_shape)}, "
        f"num_classes={data_config.num_classes}, but the dataset has image_shape={image_shape}, "
        f"num_classes={num_classes}.")


def preprocess(images: np.ndarray, labels: np.ndarray) -> Batch:
  """{"image": float32 (..., H, W, C) in [0, 1], "label": int32 (...)} from uint8 images."""
  return {"image": np.asarray(images, np.float32) / 255.0, "label": np.asarray(labels, np.int32)}


def _read(source: Any, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images (n, H, W, C) and labels (n,) of the given records, in one batched read."""
  records = source.__getitems__(indices)
  return (np.stack([r["image"] for r in records]),
          np.asarray([r["label"] for r in records], np.int32))


def train_batches(data_config: ml_collections.ConfigDict, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Infinite, shuffled training batches; `ds[step]` is this host's batch of global step `step`.

  `batch_size` is global. Grain shuffles and batches *global* record indices (reshuffled every
  epoch, keyed by `seed` only); each of the `process_count` hosts then reads just its slice of
  each global batch, b = batch_size // process_count examples: {"image": float32
  (b, H, W, C), "label": int32 (b,)}. So the global batch of a step is the same whatever the
  number of hosts, and a run resumed on another topology replays the same data.

  With `data_config.cache` (default) the split is read into memory once as uint8 and each batch
  is a vectorised gather; otherwise each batch is one batched read of only this host's records
  (for datasets too large to hold). Reading record by record would cost more than a small
  model's training step.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}.")
  source = data_source(data_config, data_config.get("train_split", "train"))
  local = batch_size // process_count
  mine = slice(process_index * local, (process_index + 1) * local)
  if data_config.get("cache", True):
    images, labels = _read(source, list(range(len(source))))
    gather = lambda indices: preprocess(images[indices[mine]], labels[indices[mine]])
  else:
    gather = lambda indices: preprocess(*_read(source, indices[mine].tolist()))
  return (grain.MapDataset.range(len(source))
          .shuffle(seed)
          .repeat()  # Infinite: grain folds the epoch into the shuffle seed.
          .batch(batch_size, drop_remainder=True)
          .map(gather))


def iterate(batches: grain.MapDataset, start_step: int = 0) -> Iterator[Batch]:
  """Iterates `batches[start_step:]`, reading ahead in background threads."""
  return iter(batches[start_step:].to_iter_dataset(_READ_OPTIONS))


def load_split(data_config: ml_collections.ConfigDict,
               split: str) -> tuple[np.ndarray, np.ndarray]:
  """Whole `split` in record order: images float32 (N, H, W, C) in [0, 1], labels int32 (N,)."""
  source = data_source(data_config, split)
  batch = preprocess(*_read(source, list(range(len(source)))))
  return batch["image"], batch["label"]
