"""train_and_evaluate end to end on the smoke config: learning, resume, preemption, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nsn_jax.checkpoint import CheckpointError, Checkpoints
from nsn_jax.data.pipeline import DatasetNotFoundError
from nsn_jax.train_lib import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/total_loss"] for r in rows if "train/total_loss" in r}


def test_trains_logs_and_checkpoints(smoke_config, tmp_path):
  smoke_config.train.steps = 40
  final = train_and_evaluate(smoke_config, str(tmp_path))
  losses = _train_losses(tmp_path)
  assert sorted(losses) == [5, 10, 15, 20, 25, 30, 35, 40]
  assert losses[40] < losses[5]
  assert final["eval/rank_8/accuracy"] > 0.5  # 10 classes: chance is 0.1
  assert os.listdir(tmp_path / "tensorboard")
  checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
  assert checkpoints.steps()[-1] == 40
  metadata = checkpoints.metadata()
  assert metadata["trained_ranks"] == [2, 4, 8]
  assert metadata["held_out_ranks"] == [1, 3, 5, 6, 7]
  assert metadata["nsn_layers"]["hidden/0"] == {
    "in_features": 784,
    "out_features": 32,
    "max_rank": 8,
  }


def test_resumed_run_reproduces_uninterrupted_losses(smoke_config, tmp_path):
  smoke_config.train.log_every = 1
  smoke_config.ranks.kind = "anchor_variants"  # random rank draws must replay too
  train_and_evaluate(smoke_config, str(tmp_path / "a"))
  # Same run, "interrupted" after its step-10 checkpoint: later state is thrown away.
  interrupted = tmp_path / "b"
  train_and_evaluate(smoke_config, str(interrupted))
  os.system(f"rm -rf {interrupted}/checkpoints/20 {interrupted}/metrics.jsonl")
  train_and_evaluate(smoke_config, str(interrupted))
  full, resumed = _train_losses(tmp_path / "a"), _train_losses(interrupted)
  assert sorted(resumed) == list(range(11, 21))
  np.testing.assert_allclose([resumed[s] for s in resumed], [full[s] for s in resumed], rtol=1e-6)


def test_checkpoint_of_another_model_is_refused_and_kept(smoke_config, tmp_path):
  train_and_evaluate(smoke_config, str(tmp_path))
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  smoke_config.model.max_rank = 4
  smoke_config.ranks.fixed = (4, 2)
  smoke_config.eval.ranks = (4,)
  with pytest.raises(
    CheckpointError,
    match=r"(?s)another model.*hidden/0/a: checkpoint \[784, 8\] vs now \[784, 4\]",
  ):
    train_and_evaluate(smoke_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_missing_dataset_is_a_clear_error(smoke_config, tmp_path):
  smoke_config.data.name = "cifar10"
  smoke_config.data.data_dir = str(tmp_path / "empty")
  with pytest.raises(DatasetNotFoundError, match="cifar10"):
    train_and_evaluate(smoke_config, str(tmp_path / "work"))


def test_bad_batch_size_is_caught_before_compiling(smoke_config, tmp_path):
  smoke_config.train.batch_size = 30  # 8 fake devices on the data axis
  with pytest.raises(ValueError, match="batch_size=30.*multiple of the data × fsdp devices"):
    train_and_evaluate(smoke_config, str(tmp_path))


def _cli(*args, **kwargs):
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **kwargs,
  )


def test_unknown_config_field_is_rejected_by_the_cli(tmp_path):
  proc = _cli(
    "train.py",
    "--config=configs/default.py:smoke",
    f"--workdir={tmp_path}",
    "--config.model.max_rnak=4",
  )
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "max_rnak" in out
  assert not os.path.exists(tmp_path / "checkpoints")


def test_sigterm_saves_a_checkpoint_and_exits(data_dir, tmp_path):
  proc = _cli(
    "train.py",
    "--config=configs/default.py:smoke",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    "--config.train.steps=100000",
    "--config.train.checkpoint_every=100000",
    "--config.eval.every=100000",
  )
  metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    time.sleep(0.2)  # the first line is written at step 5
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  steps = Checkpoints(str(tmp_path / "checkpoints")).steps()
  assert len(steps) == 1 and 5 <= steps[0] < 100000


def test_cifar10_config_trains_on_a_prepared_dataset(tmp_path):
  """The online-dataset path: configs/cifar10_mlp.py on a locally built stand-in for cifar10."""
  from fakes import FakeCifar10

  from configs import cifar10_mlp

  FakeCifar10(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  config = cifar10_mlp.get_config("smoke")
  config.data.data_dir = str(tmp_path / "tfds")
  config.train.steps, config.train.batch_size, config.eval.batch_size = 4, 8, 8
  config.train.log_every = 2
  final = train_and_evaluate(config, str(tmp_path / "work"))
  assert 0.0 <= final["eval/rank_8/accuracy"] <= 1.0
  metadata = Checkpoints(str(tmp_path / "work" / "checkpoints")).metadata()
  assert metadata["nsn_layers"]["hidden/0"]["in_features"] == 32 * 32 * 3


def test_digits_config_trains_and_evaluates(data_dir, tmp_path):
  """configs/digits_mlp.py's model (64 → 128 → 128 → 10, R = 32): a few steps, then a sweep."""
  from configs import digits_mlp
  from nsn_jax.sweep import run_sweep

  config = digits_mlp.get_config()
  config.data.data_dir = data_dir
  config.train.steps, config.optimizer.warmup_steps, config.train.log_every = 30, 2, 10
  config.ranks.fixed, config.eval.ranks = (32, 8), (32,)  # few programs to compile
  final = train_and_evaluate(config, str(tmp_path))
  assert final["eval/rank_32/accuracy"] > 0.5  # 10 classes: chance is 0.1
  layers = Checkpoints(str(tmp_path / "checkpoints")).metadata()["nsn_layers"]
  assert layers["hidden/0"] == {"in_features": 64, "out_features": 128, "max_rank": 32}
  (row,) = run_sweep(str(tmp_path), "32", verbose=False)  # eval.py's path
  assert row.accuracy == final["eval/rank_32/accuracy"] and row.flops_frac_dense < 1


def test_remote_workdir_needs_a_local_metrics_dir(smoke_config):
  with pytest.raises(ValueError, match="--metrics_dir=.*valid: a local directory"):
    train_and_evaluate(smoke_config, "gs://bucket/run")


def test_a_nested_mlp_starts_from_its_dense_twins_svd(smoke_config, tmp_path):
  import jax

  from nsn_jax.build import nsn_from_dense
  from nsn_jax.config import ConfigError
  from nsn_jax.restore import restore_model

  dense = smoke_config.copy_and_resolve_references()
  dense.model.dense, dense.eval.ranks, dense.train.steps = True, (), 10
  train_and_evaluate(dense, str(tmp_path / "dense"))
  twin = restore_model(str(tmp_path / "dense")).model
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
  full = smoke_config.copy_and_resolve_references()
  full.model.max_rank = 32  # the hidden layer's full rank: the SVD reproduces it
  np.testing.assert_allclose(nsn_from_dense(full, twin)(x, rank=32), twin(x), atol=1e-4)

  smoke_config.model.init_from = str(tmp_path / "dense")
  smoke_config.train.steps = 10
  final = train_and_evaluate(smoke_config, str(tmp_path / "nsn"))
  assert np.isfinite(final["eval/rank_2/loss"])
  smoke_config.model.hidden = (16,)
  with pytest.raises(ConfigError, match=r"model.init_from=.*another model.hidden"):
    train_and_evaluate(smoke_config, str(tmp_path / "other"))
