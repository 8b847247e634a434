"""Texts to fixed-length token arrays, for any tokenizer given as a `str -> token ids` function."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np


def encode_texts(
  texts: Iterable[str | bytes],
  encode: Callable[[str], Sequence[int]],
  seq_len: int,
  pad_id: int,
  bos_id: int | None = None,
) -> dict[str, np.ndarray]:
  """Tokenises `texts` into one padded batch.

  Each text becomes `[bos_id] + encode(text)` (no BOS when `bos_id` is None), cut to its first
  `seq_len` tokens and right-padded with `pad_id`. Texts may be `str` or UTF-8 `bytes`: TFDS
  `Text` features read through `tfds.data_source` are bytes, while its mock data gives str.
  Returns, for N texts and T = `seq_len`:
    "tokens": int32 (N, T), the token ids;
    "mask": bool (N, T), True on real tokens (BOS included), False on padding.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be positive, got {seq_len}.")
  prefix = [] if bos_id is None else [bos_id]
  rows = [
    prefix + list(encode(text.decode("utf-8") if isinstance(text, bytes) else text))
    for text in texts
  ]
  tokens = np.full((len(rows), seq_len), pad_id, np.int32)
  mask = np.zeros((len(rows), seq_len), bool)
  for i, row in enumerate(rows):
    n = min(len(row), seq_len)
    tokens[i, :n] = row[:n]
    mask[i, :n] = True
  return {"tokens": tokens, "mask": mask}
