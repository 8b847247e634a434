"""Input pipeline: TFDS random-access sources read with grain, no TensorFlow.

`train_batches(...)[step]` is the host-local part of global step `step`'s batch, a pure function
of (dataset, seed, step, the batch rows this host holds): a run resumed at step s reads exactly
the batch the uninterrupted run read, with no iterator state to checkpoint. `load_split` reads
a whole split for evaluation.

Datasets: the offline builders (`mnist5k`, `shakespeare/genre`, `shakespeare/lm`: built from files
installed with the code, prepared on first use), `digits` (scikit-learn's, written once as an
.npz of arrays), your own arrays (`npz:PATH`) or any TFDS dataset already prepared in
`array_record` format under `data_config.data_dir`; nothing is downloaded. Image datasets give
{"image", "label"}; a text dataset (`data_config.text_feature` set) is tokenised with the model's
tokenizer (a `TextEncoder`) into {"tokens", "mask"}, plus "label" when the config has classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from nsn_jax.data import arrays, digits, mnist5k, shakespeare  # the last two: TFDS builders
from nsn_jax.data.text import encode_texts

Batch = dict[str, np.ndarray]
# Builders that prepare from files installed with the code (`make setup`), never the network.
OFFLINE_BUILDERS = (mnist5k.Mnist5k.name, shakespeare.Shakespeare.name)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """How a model turns text into token ids: `encode(str) → ids`, and the id that pads."""

  encode: Callable[[str], Sequence[int]]
  pad_id: int


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
    "then copy DIR to this machine and set data_dir (or TFDS_DATA_DIR) to it."
  )


def data_source(data_config: ml_collections.ConfigDict, split: str) -> Any:
  """Random-access source of `split` (TFDS, or an .npz of arrays when data.name is "npz:PATH"
  or "digits"): `len(src)`, `src[i]` and `src.__getitems__(keys)`.

  Records are dicts of numpy values ({"image": uint8 (H, W, C), "label": int, ...} or
  {"text": bytes, ...}), decoded without TensorFlow (Image features through PIL). Raises
  DatasetNotFoundError when the dataset or split is not prepared, ValueError when its features
  do not match `data_config`.
  """
  name, data_dir = data_config.name, data_config.data_dir
  if name == digits.NAME:  # built in: the arrays of scikit-learn's digits, written on first use
    name = arrays.PREFIX + digits.prepare(data_dir or tfds.core.constants.DATA_DIR)
  if name.startswith(arrays.PREFIX):  # the user's own arrays (nsn_jax.data.save_arrays)
    source = arrays.ArraySource(name.removeprefix(arrays.PREFIX), split)
    source.check(data_config.image_shape, data_config.num_classes, data_config.text_feature)
    return source
  searched = data_dir or f"{tfds.core.constants.DATA_DIR} (the TFDS default)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise _not_found(name, searched, "no such TFDS builder, and none prepared there.") from e
  if name.split("/")[0] in OFFLINE_BUILDERS and not builder.is_prepared():
    # Built from files installed with the code: preparing needs no network.
    # Processes sharing a data_dir race to prepare it; the first to finish wins and the
    # others' identical copies are dropped.
    with contextlib.suppress(FileExistsError):
      builder.download_and_prepare()
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
  """Fails early when the config's image shape, text feature or class count disagrees with the
  dataset's."""
  text = data_config.text_feature
  wanted, found = {}, {}
  if data_config.num_classes is not None:  # None: language modelling, no labels read
    wanted["num_classes"] = data_config.num_classes
    found["num_classes"] = features["label"].num_classes if "label" in features else None
  if text:
    wanted["text_features"] = _text_features(data_config)
    found["text_features"] = tuple(k for k in wanted["text_features"] if k in features)
  else:
    wanted["image_shape"] = tuple(data_config.image_shape)
    found["image_shape"] = tuple(features["image"].shape) if "image" in features else None
  if found != wanted:
    raise ValueError(
      f"data config for {data_config.name!r} says {wanted}, but the dataset "
      f"has {found} (features: {sorted(features)})."
    )


def _text_features(data_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """`data.text_feature`: one feature ("text") or several (("premise", "hypothesis"))."""
  text = data_config.text_feature
  return (text,) if isinstance(text, str) else tuple(text)


def _joined(record: dict, keys: tuple[str, ...]) -> str:
  """The record's text features as one text, one line each (TFDS gives Text as UTF-8 bytes)."""
  return "\n".join(
    v.decode("utf-8") if isinstance(v, bytes) else v for v in (record[k] for k in keys)
  )


def record_reader(
  data_config: ml_collections.ConfigDict, encoder: TextEncoder | None = None
) -> Callable[[list[dict]], Batch]:
  """records → host arrays: {"image": uint8 (n, H, W, C), "label": int32 (n,)} for images, or
  {"tokens": int32 (n, T), "mask": bool (n, T)} (+ "label") for text, T = data.seq_len; several
  text features are joined, one line each."""
  text, labelled = data_config.text_feature, data_config.num_classes is not None
  if text and encoder is None:
    raise ValueError(f"{data_config.name!r} is a text dataset: it needs the model's tokenizer.")
  keys = _text_features(data_config) if text else ()

  def read(records: list[dict]) -> Batch:
    if text:
      batch = encode_texts(
        [_joined(r, keys) for r in records], encoder.encode, data_config.seq_len, encoder.pad_id
      )
    else:
      batch = {"image": np.stack([r["image"] for r in records])}
    if labelled:
      batch["label"] = np.asarray([r["label"] for r in records], np.int32)
    return batch

  return read


def preprocess(batch: Batch) -> Batch:
  """Model inputs: uint8 images become float32 in [0, 1]; everything else passes unchanged."""
  if "image" in batch:
    batch = {**batch, "image": np.asarray(batch["image"], np.float32) / 255.0}
  return batch


def train_batches(
  data_config: ml_collections.ConfigDict,
  batch_size: int,
  seed: int,
  rows: np.ndarray | None = None,
  encoder: TextEncoder | None = None,
) -> grain.MapDataset:
  """Infinite, shuffled training batches; `ds[step]` is this host's part of global step `step`.

  `batch_size` is global. Grain shuffles and batches *global* record indices (reshuffled every
  epoch, keyed by `seed` only); a host then reads just `rows` (positions in the global batch,
  `nsn_jax.sharding.process_rows`: the rows its devices hold; None = all) of each global batch,
  as `record_reader`'s arrays, `preprocess`ed. So the global batch of a step is the same
  whatever the number of hosts, and a run resumed on another topology replays the same data.

  With `data_config.cache` (default) the split is read (and tokenised) into host memory once
  and each batch is a vectorised gather; otherwise each batch is one batched read of only this
  host's records (for datasets too large to hold). Reading record by record would cost more
  than a small model's training step.
  """
  rows = np.arange(batch_size) if rows is None else np.asarray(rows)
  if rows.size == 0 or rows.min() < 0 or rows.max() >= batch_size:
    raise ValueError(f"rows {rows.tolist()} are not positions in a batch of {batch_size}.")
  source = data_source(data_config, data_config.train_split)
  read = record_reader(data_config, encoder)
  if data_config.cache:
    arrays = read(source.__getitems__(list(range(len(source)))))
    gather = lambda indices: preprocess({k: v[indices[rows]] for k, v in arrays.items()})
  else:
    gather = lambda indices: preprocess(read(source.__getitems__(indices[rows].tolist())))
  return (
    grain.MapDataset.range(len(source))
    .shuffle(seed)
    .repeat()  # Infinite: grain folds the epoch into the shuffle seed.
    .batch(batch_size, drop_remainder=True)
    .map(gather)
  )


def iterate(batches: grain.MapDataset, start_step: int = 0) -> Iterator[Batch]:
  """Iterates `batches[start_step:]`, reading ahead in background threads."""
  return iter(batches[start_step:].to_iter_dataset(_READ_OPTIONS))


def load_split(
  data_config: ml_collections.ConfigDict,
  split: str,
  encoder: TextEncoder | None = None,
  limit: int | None = None,
) -> Batch:
  """A split for evaluation: `record_reader`'s arrays, `preprocess`ed, in record order.

  `limit` (or `data_config.eval_examples`; None or 0 = all) keeps that many records drawn
  without replacement by a fixed seed, so a capped split still mixes its classes and plays.
  """
  source = data_source(data_config, split)
  limit = limit or data_config.eval_examples or len(source)
  indices = list(range(len(source)))
  if limit < len(source):
    indices = sorted(np.random.default_rng(0).choice(len(source), limit, replace=False).tolist())
  return preprocess(record_reader(data_config, encoder)(source.__getitems__(indices)))
