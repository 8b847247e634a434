"""Peak device memory while a pretrained model is loaded, decomposed and laid out on a mesh of
fake CPU devices, as train.py does it: each tensor goes from host memory straight into its
shards, the calibration batches run on the sharded model, and each layer's factors move into
their shards as soon as its SVD is done. A one-device mesh (data=1) is the control.

  python -m benchmarks.sharded_load --config configs/smollm2_lm.py \\
      --meshes "fsdp=8;fsdp=2,tensor=4;data=1" --out docs/sharded-load.json

A sampler thread adds up the bytes every live jax.Array holds on each device (its shard shape ×
item size, for every device its sharding names), every 20 ms, from the first tensor read
until the train state (parameters and optimizer moments) exists. XLA's workspace inside one
operation (a layer's SVD) is not a live array and is not seen; it is one layer's size. "whole
model" is the dense model's parameters (float32), what one device held before.
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import os
import sys
import threading
import time

if "jax" not in sys.modules:  # fake devices for the mesh, before jax is first imported
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("PJRT_NPROC", "16")  # no collective deadlock on 2 cores

from flax import nnx
import jax

from benchmarks import run as bench_run
from benchmarks.common import Column, write_report
from benchmarks.sharded_step import add_config_arguments, load_config
from nsn_jax import config as config_lib
from nsn_jax import sharding
from nsn_jax.build import build_model, text_encoder
from nsn_jax.data import pipeline
from nsn_jax.tasks import config_task
from nsn_jax.train_lib import model_and_method
from nsn_jax.train_step import create_train_state

COLUMNS = (
  Column("mesh", "mesh"),
  Column("devices", "devices"),
  Column("model_mib", "whole model MiB", ".1f"),
  Column("peak_mib", "peak MiB/dev", ".1f"),
  Column("peak_device", "peak on"),
  Column("state_mib", "state MiB/dev", ".1f"),
  Column("peak_over_model", "peak/model", ".3f"),
  Column("seconds", "s", ".1f"),
)


def device_bytes() -> dict[int, int]:
  """Bytes of live jax.Arrays per device id (a replicated array counts on every device)."""
  held = collections.Counter()
  for x in jax.live_arrays():
    shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    for device in x.sharding.device_set:
      held[device.id] += shard
  return held


class PeakSampler:
  """Samples `device_bytes` every `interval` seconds in a thread; `peak` per device id counts
  only what was allocated since the sampler started (arrays alive before it are not ours)."""

  def __init__(self, interval: float = 0.02):
    self.interval, self.peak, self.error = interval, collections.Counter(), None
    gc.collect()  # what an earlier measurement left must not be freed during this one
    self._before = device_bytes()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    try:
      while not self._stop.is_set():
        self.sample()
        time.sleep(self.interval)
    except Exception as e:  # re-raised on exit, not lost with the thread
      self.error = e

  def sample(self) -> None:
    for device, held in device_bytes().items():
      self.peak[device] = max(self.peak[device], held - self._before[device])

  def __enter__(self) -> PeakSampler:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    if self.error is not None:
      raise self.error
    self.sample()


def measure(config, mesh_spec: str) -> dict:
  """What train.py does before its first step (load, calibrate, surgery, method, train state)
  on `mesh_spec`, with the peak bytes any device held meanwhile."""
  mesh = sharding.make_mesh(sharding.parse_mesh(mesh_spec))
  task, encoder = config_task(config), text_encoder(config)
  batches = lambda: pipeline.train_batches(config.data, config.train.batch_size, 0, None, encoder)
  start = time.perf_counter()
  with PeakSampler() as sampler:
    model, method = model_and_method(config, task, batches, mesh)
    _, state, state_sharding = create_train_state(config, mesh, model)
    del model, method
  seconds = time.perf_counter() - start
  device, peak = max(sampler.peak.items(), key=lambda item: item[1])
  dense_config = config.copy_and_resolve_references()
  dense_config.model.dense = True  # the architecture before surgery, as shapes
  dense = nnx.eval_shape(lambda: build_model(dense_config, seed=0, pretrained=False))
  model_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(dense)))
  return {
    "mesh": mesh_spec,
    "devices": mesh.size,
    "model_mib": model_bytes / 2**20,
    "peak_mib": peak / 2**20,
    "peak_device": device,
    "state_mib": sharding.bytes_per_device(state, state_sharding) / 2**20,
    "peak_over_model": peak / model_bytes,
    "seconds": seconds,
  }


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded_load", description=__doc__)
  add_config_arguments(parser)
  parser.add_argument(
    "--meshes", default="fsdp=8;data=1", help="';'-separated; data=1 is one device (the control)"
  )
  parser.add_argument("--out", default="runs/benchmarks/sharded_load.json")
  return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
  args = parse_args(argv)
  config = load_config(args)
  config_lib.validate(config, jax.device_count())
  rows = []
  for mesh_spec in filter(None, (m.strip() for m in args.meshes.split(";"))):
    rows.append(measure(config, mesh_spec))
    print(bench_run.format_table(rows[-1:], COLUMNS), flush=True)
  environment = bench_run.environment(argv, "benchmarks.sharded_load")
  report = {"environment": environment, "surgery": config.surgery.init, "rows": rows}
  print(bench_run.format_table(rows, COLUMNS))
  print(f"wrote {write_report(args.out, report)}")
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
