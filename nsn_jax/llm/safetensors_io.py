"""Safetensors checkpoints read one tensor at a time from memory-mapped files, and written whole.

A Hugging Face directory holds `model.safetensors`, or shards listed by
`model.safetensors.index.json` ({"weight_map": {tensor name: file}}). The format is an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} and the raw
data. `safetensors.numpy` cannot read bfloat16 (what most released LLMs ship), so the reader is
this module's own: `np.memmap` views typed with ml_dtypes, converted to float32 one tensor at a
time, so a checkpoint is never read whole into memory beside the model it fills (host memory
still holds that model in float32). Writing uses the `safetensors` package.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib
import struct

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class SafetensorsFiles:
  """The tensors of a checkpoint directory (one file or an indexed set of shards), by name.

  Raises FileNotFoundError naming the directory if it has neither file, ValueError naming the
  file if a header is malformed or the index names a file that is missing.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    index, single = self.directory / INDEX, self.directory / SINGLE
    if index.is_file():
      weight_map = json.loads(index.read_text()).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no weight_map {{tensor name: file}}.")
      files = sorted(set(weight_map.values()))
    elif single.is_file():
      files = [SINGLE]
    else:
      raise FileNotFoundError(f"{self.directory} has neither {SINGLE} nor {INDEX}.")
    self._entries: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for name in files:
      path = self.directory / name
      if not path.is_file():
        raise ValueError(f"{index} lists {name}, which is missing from {self.directory}.")
      header, data_start = _header(path)
      for tensor, entry in header.items():
        if tensor != "__metadata__":
          self._entries[tensor] = (path, entry, data_start)

  def names(self) -> list[str]:
    return sorted(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name][1]["shape"])

  def read(self, name: str, dtype=np.float32) -> np.ndarray:
    """The tensor `name` as `dtype` (None: as stored), numpy order, from its memory-mapped file."""
    path, entry, data_start = self._entries[name]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(
        f"{path}: tensor {name!r} has dtype {entry['dtype']}; known: {list(_DTYPES)}"
      )
    begin, end = entry["data_offsets"]
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    stored = raw.view(np.dtype(_DTYPES[entry["dtype"]])).reshape(entry["shape"])
    return np.array(stored) if dtype is None else stored.astype(dtype)


def _header(path: pathlib.Path) -> tuple[dict, int]:
  """(the JSON header, the offset where the data starts) of one safetensors file."""
  with open(path, "rb") as f:
    raw = f.read(8)
    length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
    if not 0 < length <= os.path.getsize(path) - 8:
      raise ValueError(f"{path} is not a safetensors file (bad header length).")
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise ValueError(f"{path} is not a safetensors file ({e}).") from None
  return header, 8 + length


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
  """Writes `tensors` to `path` as one safetensors file, atomically (a temporary file, then
  a rename: never a half-written checkpoint)."""
  path = pathlib.Path(path)
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
  save_file(arrays, str(temporary), metadata=dict(metadata or {}))
  os.replace(temporary, path)
