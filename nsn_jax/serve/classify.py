"""The classifier engine: images (raw pixels) or texts → label probabilities at a rank."""

from __future__ import annotations

import base64
from collections.abc import Sequence
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from nsn_jax import config as config_lib
from nsn_jax.build import text_encoder
from nsn_jax.data.pipeline import preprocess
from nsn_jax.data.text import encode_texts
from nsn_jax.llm.decode import Weights
from nsn_jax.restore import Restored
from nsn_jax.serve.engine import MAX_TEXT_CHARS, Engine, Parsed, RequestError, json_repr
from nsn_jax.tasks import config_task


class Classifier(Engine):
  """Images (raw pixel values, as the dataset stores them) or texts → label probabilities."""

  kind = "classify"

  def __init__(
    self,
    restored: Restored,
    ranks,
    batch_sizes,
    budget_reference="max_rank",
    profiles=None,
    store=None,
  ):
    seq_len = config_lib.seq_len(restored.config)
    # A text example is a whole forward pass over seq_len tokens: FLOPs per example, not token.
    super().__init__(
      restored,
      ranks,
      batch_sizes,
      seq_len,
      budget_reference,
      profiles,
      rows_per_unit=seq_len or 1,
      store=store,
    )
    config = restored.config
    self.task = config_task(config)
    self.text = config.task == "text_classification"
    self.encoder = text_encoder(config) if self.text else None
    inputs = ("texts",) if self.text else ("inputs", "inputs_b64")
    self.keys = frozenset({*inputs, "rank", "budget"})
    # Pixels arrive flat (N × input_size) and are shaped as the dataset's images.
    self.image_shape = tuple(config.data.image_shape)
    self.input_size = None if self.text else math.prod(self.image_shape)
    self.weights = {point: Weights.of(self.fixed_model(point)) for point in self.ranks}
    task = self.task

    def probabilities(leaves, batch, graphdef, treedef):
      model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
      return jax.nn.softmax(task.logits(model, batch, None).astype(jnp.float32), axis=-1)

    self._jit = jax.jit(probabilities, static_argnums=(2, 3))

  def _example_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    if self.text:
      return {
        "tokens": np.zeros((batch_size, self.seq_len), np.int32),
        "mask": np.ones((batch_size, self.seq_len), bool),
      }
    return {"image": np.zeros((batch_size, *self.image_shape), np.float32)}

  def compile(self, rank, batch_size: int) -> None:
    example = self._example_batch(batch_size)
    w = self.weights[rank]
    self._program(
      (rank, batch_size),
      f"classify-{self.label(rank)}-batch{batch_size}",
      lambda: self._jit.lower(w.leaves, example, w.graphdef, w.treedef),
    )

  def parse(self, body: Any, max_rows: int) -> Parsed:
    rank, budget = self.parse_common(body)
    texts = body.get("texts")
    if self.text and isinstance(texts, list):
      _check_rows(len(texts), max_rows)  # before tokenising them
    inputs = self._parse_texts(body) if self.text else self._parse_images(body)
    rows = _check_rows(len(next(iter(inputs.values()))), max_rows)
    return Parsed(inputs, rows, 1.0, self.resolve(rank, budget), budget)

  def _parse_images(self, body: dict) -> dict[str, np.ndarray]:
    valid = (
      f"a non-empty list of examples, each {self.input_size} pixel values in [0, 255] "
      "(nested as the image's shape or flat)"
    )
    if ("inputs" in body) == ("inputs_b64" in body):
      raise RequestError(422, f"inputs or inputs_b64: give one; valid inputs: {valid}")
    if "inputs_b64" in body:
      return self._parse_image_bytes(body["inputs_b64"])
    try:
      images = np.asarray(body["inputs"], np.float64)
    except (ValueError, TypeError, OverflowError):
      raise RequestError(
        422, f"inputs: not a rectangular array of numbers; valid: {valid}"
      ) from None
    if images.ndim < 2 or len(images) == 0 or math.prod(images.shape[1:]) != self.input_size:
      raise RequestError(422, f"inputs: shape {list(images.shape)}; valid: {valid}")
    if not np.all(np.isfinite(images)) or images.min() < 0 or images.max() > 255:
      raise RequestError(422, f"inputs: values outside [0, 255] or not finite; valid: {valid}")
    # The dataset's uint8 pixels, preprocessed as training and eval.py preprocess them.
    return preprocess({"image": images.reshape(-1, *self.image_shape).astype(np.float32)})

  def _parse_image_bytes(self, encoded) -> dict[str, np.ndarray]:
    """inputs_b64: base64 of the uint8 pixels of N examples, row-major (N · input_size bytes):
    a 40× smaller body than JSON numbers, parsed in microseconds."""
    valid = f"base64 of N × {self.input_size} uint8 pixel values, N ≥ 1"
    try:
      pixels = np.frombuffer(base64.b64decode(encoded, validate=True), np.uint8)
    except (TypeError, ValueError):
      raise RequestError(422, f"inputs_b64: not base64; valid: {valid}") from None
    if not pixels.size or pixels.size % self.input_size:
      raise RequestError(422, f"inputs_b64: {pixels.size} bytes; valid: {valid}")
    return preprocess({"image": pixels.reshape(-1, *self.image_shape)})

  def _parse_texts(self, body: dict) -> dict[str, np.ndarray]:
    texts = body.get("texts")
    valid = "a non-empty list of strings"
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
      raise RequestError(422, f"texts={json_repr(texts)}: valid: {valid}")
    if max(map(len, texts)) > MAX_TEXT_CHARS:
      raise RequestError(
        413, f"texts: a text of {max(map(len, texts))} characters; valid: at most {MAX_TEXT_CHARS}"
      )
    # Tokenised and cut to data.seq_len exactly as the training and eval pipelines do.
    return encode_texts(texts, self.encoder.encode, self.seq_len, self.encoder.pad_id)

  def run(self, rank, batch_size: int, requests: Sequence[Parsed]) -> tuple[list[dict], float]:
    """Probabilities for each request's rows, one padded batch; (results, units run)."""
    arrays = {key: np.concatenate([r.inputs[key] for r in requests]) for key in requests[0].inputs}
    rows = len(next(iter(arrays.values())))
    padded = {
      k: np.concatenate([v, np.zeros((batch_size - rows, *v.shape[1:]), v.dtype)])
      for k, v in arrays.items()
    }
    self.compile(rank, batch_size)  # a no-op once compiled at start-up
    program = self._programs[(rank, batch_size)]
    probs = np.asarray(program(self.weights[rank].leaves, padded))[:rows]
    results, start = [], 0
    for request in requests:
      own = probs[start : start + request.rows]
      start += request.rows
      results.append({"labels": own.argmax(-1).tolist(), "probabilities": own.tolist()})
    return results, 1.0

  def warm_up_request(self, batch_size: int) -> list[Parsed]:
    """A request filling `batch_size` rows, for start-up latency measurements."""
    inputs = self._example_batch(batch_size)
    return [Parsed(inputs, batch_size, 1.0, None, None)]


def _check_rows(rows: int, max_rows: int) -> int:
  """`rows`, or a RequestError 413 when one request holds more than a batch."""
  if rows > max_rows:
    raise RequestError(413, f"{rows} examples: valid: at most {max_rows} per request")
  return rows
