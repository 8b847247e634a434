"""Faults a long run meets: corrupt checkpoints, divergence, a second trainer, Ctrl-C, kill -9.

Each test trains the smoke config for seconds and asserts that nothing is lost and training can
always go on."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from nsn_jax.checkpoint import CheckpointError, Checkpoints
from nsn_jax.train_lib import train_and_evaluate
from nsn_jax.workdir import WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _logged_steps(workdir) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f if "train/total_loss" in line]


@pytest.fixture(scope="module")
def trained_20(tmp_path_factory, data_dir):
  """A smoke run of 20 steps with checkpoints at 10 and 20."""
  from configs import default

  config = default.get_config("smoke")
  config.data.data_dir = data_dir
  workdir = tmp_path_factory.mktemp("trained_20")
  train_and_evaluate(config, str(workdir))
  return workdir


def _newest_array_file(workdir, step: int) -> str:
  """The largest data file of step `step`'s params (the hidden layer's factor)."""
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(workdir / "checkpoints" / str(step) / "params")
    for name in names
  ]
  return max(files, key=os.path.getsize)


def _flip(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(os.urandom(64))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
  "corrupt", [_flip, _truncate, os.remove], ids=["flip", "truncate", "delete"]
)
def test_training_resumes_past_a_corrupt_newest_checkpoint(
  trained_20, smoke_config, tmp_path, corrupt
):
  workdir = tmp_path / "run"
  shutil.copytree(trained_20, workdir)
  corrupt(_newest_array_file(workdir, 20))
  smoke_config.train.steps = 30
  final = train_and_evaluate(smoke_config, str(workdir))  # resumes from 10, saves 20 and 30 anew
  assert np.isfinite(final["eval/rank_8/loss"])
  assert Checkpoints(str(workdir / "checkpoints")).steps() == [10, 20, 30]
  assert os.listdir(workdir / "quarantine") == ["20"]  # kept, not deleted
  assert _logged_steps(workdir) == [5, 10, 15, 20, 25, 30]  # replayed steps logged once


def test_divergence_never_reaches_a_checkpoint(trained_20, smoke_config, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_20, workdir)
  smoke_config.train.steps, smoke_config.train.checkpoint_every = 40, 2
  smoke_config.train.log_every, smoke_config.optimizer.learning_rate = 50, 1e36
  with pytest.raises(FloatingPointError, match=r"step 2\d: .*NaN/inf; the last checkpoint is"):
    train_and_evaluate(smoke_config, str(workdir))
  checkpoints = Checkpoints(str(workdir / "checkpoints"))
  for step in checkpoints.steps():  # every checkpoint left restores finite
    params = checkpoints.restore(_abstract(checkpoints, step), step=step)[1]
    assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(params)), step
  assert 20 in checkpoints.steps()  # the good ones were not rotated out
  smoke_config.optimizer.learning_rate = 1e-2  # a bad run never blocks the next one
  assert np.isfinite(train_and_evaluate(smoke_config, str(workdir))["eval/rank_8/loss"])


def _abstract(checkpoints, step):
  import jax

  shapes = checkpoints.metadata(step)["param_shapes"]
  tree = {}
  for path, shape in shapes.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jax.ShapeDtypeStruct(tuple(shape), np.float32)
  return tree


def _leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def _train_cli(workdir, data_dir, *overrides):
  return subprocess.Popen(
    [
      sys.executable,
      "train.py",
      "--config=configs/default.py:smoke",
      f"--workdir={workdir}",
      f"--config.data.data_dir={data_dir}",
      *overrides,
    ],
    cwd=REPO,
    env={**os.environ, "PYTHONPATH": REPO},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait_for_first_log(workdir, proc, timeout=120):
  metrics, deadline = workdir / "metrics.jsonl", time.time() + timeout
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0]
    time.sleep(0.2)


def test_second_trainer_is_refused_and_ctrl_c_saves(data_dir, smoke_config, tmp_path):
  workdir = tmp_path / "run"
  first = _train_cli(
    workdir,
    data_dir,
    "--config.train.steps=100000",
    "--config.train.checkpoint_every=100000",
    "--config.eval.every=100000",
  )
  try:
    _wait_for_first_log(workdir, first)
    with pytest.raises(WorkdirLockedError, match=rf"pid {first.pid} on host .* is using "):
      train_and_evaluate(smoke_config, str(workdir))
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
  finally:
    first.kill()
  assert first.returncode == 0 and "Traceback" not in out, out
  steps = Checkpoints(str(workdir / "checkpoints")).steps()
  assert len(steps) == 1 and 5 <= steps[0] < 100000  # Ctrl-C saved where it stopped
  logged = _logged_steps(workdir)
  assert logged == sorted(set(logged))  # the refused trainer wrote nothing


def test_kill_9_mid_run_then_resume_finishes(data_dir, tmp_path):
  workdir = tmp_path / "run"
  proc = _train_cli(
    workdir,
    data_dir,
    "--config.train.steps=400",
    "--config.train.checkpoint_every=1",
    "--config.train.log_every=1",
  )
  try:
    _wait_for_first_log(workdir, proc)
    time.sleep(1.0)  # saving every step: the kill lands in or near a save
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  finally:
    proc.kill()
  resumed = _train_cli(
    workdir,
    data_dir,
    "--config.train.steps=400",
    "--config.train.checkpoint_every=100",
    "--config.train.log_every=1",
  )
  out, _ = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, out[-3000:]
  assert Checkpoints(str(workdir / "checkpoints")).steps()[-1] == 400
  assert _logged_steps(workdir) == list(range(1, 401))  # each step once, killed or not


def test_resume_with_another_training_setup_is_refused_not_quarantined(trained_20, smoke_config):
  """A changed train.trainable changes the optimizer state: refused by name, nothing moved."""
  smoke_config.train.trainable = ("hidden",)
  with pytest.raises(CheckpointError, match="another training state"):
    train_and_evaluate(smoke_config, str(trained_20))
  assert not (trained_20 / "quarantine").exists()
  assert Checkpoints(str(trained_20 / "checkpoints")).steps() == [10, 20]


def test_a_finished_run_rerun_evaluates_and_logs_nothing_twice(smoke_config, tmp_path):
  """The same folder given twice (workdir and metrics_dir, spelled differently) is one lock;
  re-running a finished run evaluates its checkpoint and writes no second final line."""
  workdir = tmp_path / "run"
  first = train_and_evaluate(smoke_config, f"{workdir}/", metrics_dir=str(workdir))
  again = train_and_evaluate(smoke_config, str(workdir))
  assert again == pytest.approx(first)
  with open(workdir / "metrics.jsonl") as f:
    finals = [line for line in f if '"step": 20' in line and "eval/" in line]
  assert len(finals) == 1
