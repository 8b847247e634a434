"""Checkpoints that survive corruption: checksums, quarantine, explicit steps; the workdir lock."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from nsn_jax.checkpoint import (
  CheckpointError,
  Checkpoints,
  abstract_tree,
  fingerprints,
  param_shapes,
)
from nsn_jax.workdir import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trees(seed: int, width: int = 32):
  """(params, train): a 32×32 float32 matrix (the largest array: ~4 KB on disk), a bfloat16 bias;
  an int32 step counter and a float32 moment."""
  rng = np.random.default_rng(seed)
  params = {
    "hidden": {
      0: {
        "a": jnp.asarray(rng.standard_normal((width, 32)), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(32), jnp.bfloat16),
      }
    }
  }
  train = {
    "count": jnp.asarray(seed, jnp.int32),
    "mu": jnp.asarray(rng.standard_normal(16), jnp.float32),
  }
  return params, train


def _save(directory, steps=(1, 2), train=True):
  """Saves each step with _trees(step); returns {step: (params, train)}."""
  checkpoints = Checkpoints(str(directory), writable=True)
  saved = {}
  for step in steps:
    params, state = saved[step] = _trees(step)
    checkpoints.save(step, params, state if train else None, {"param_shapes": param_shapes(params)})
  checkpoints.wait()
  checkpoints.close()
  return saved


def _restore(directory, writable, step=None, params_like=None):
  params, train = _trees(0) if params_like is None else (params_like, None)
  checkpoints = Checkpoints(str(directory), writable=writable)
  try:
    return checkpoints.restore(
      abstract_tree(params), None if train is None else abstract_tree(train), step=step
    )
  finally:
    checkpoints.close()


def _same(a, b) -> bool:
  return jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def _data_file(step_dir) -> str:
  """The largest array data file of the step's params item (the 32×32 matrix's chunk)."""
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(step_dir / "params")
    for name in names
    if os.path.basename(root) == "d"
  ]
  return max(files, key=os.path.getsize)


def _corrupt(step_dir, how: str) -> None:
  if how == "metadata":
    with open(step_dir / "metadata" / "metadata", "w") as f:
      f.write("{not json")
    return
  path = _data_file(step_dir)
  if how == "delete":
    os.remove(path)
    return
  with open(path, "rb") as f:
    data = bytearray(f.read())
  middle = len(data) // 2
  if how == "flip":
    data[middle - 32 : middle + 32] = bytes(b ^ 0xFF for b in data[middle - 32 : middle + 32])
  else:  # truncate
    data = data[:middle]
  with open(path, "wb") as f:
    f.write(data)


def _edit_metadata(step_dir, edit) -> None:
  path = step_dir / "metadata" / "metadata"
  metadata = json.loads(path.read_text())
  edit(metadata)
  path.write_text(json.dumps(metadata))


def test_fingerprints_ignore_sharding_and_see_one_changed_bit():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32)
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  trees = {
    "f32": x,
    "bf16": x.astype(jnp.bfloat16),
    "i16": (x * 100).astype(jnp.int16),
    "i8": (x * 10).astype(jnp.int8),
    "bool": x > 0,
    "scalar": jnp.float32(3.0),
  }
  one = fingerprints({"t": trees})["t"]
  assert all(len(v) == 16 for v in one.values()) and set(one) == set(trees)
  for spec in (P("a", "b"), P(None, ("a", "b"))):
    sharded = {
      k: jax.device_put(v, NamedSharding(mesh, spec if v.ndim == 2 else P()))
      for k, v in trees.items()
    }
    assert fingerprints({"t": sharded})["t"] == one, spec
  sign = jax.lax.bitcast_convert_type(x, jnp.uint32).at[3, 5].add(np.uint32(2**31))
  swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
  for changed in (jax.lax.bitcast_convert_type(sign, jnp.float32), swapped):
    assert fingerprints({"t": {"f32": changed}})["t"]["f32"] != one["f32"]


def test_round_trip_records_and_verifies_checksums(tmp_path):
  directory = tmp_path / "checkpoints"
  saved = _save(directory)
  step, params, train, metadata = _restore(directory, writable=False)
  assert step == 2 and _same(params, saved[2][0]) and _same(train, saved[2][1])
  assert sorted(metadata["checksums"]["params"]) == ["hidden/0/a", "hidden/0/bias"]
  assert sorted(metadata["checksums"]["train"]) == ["count", "mu"]
  assert (
    metadata["checksums"]["params"]["hidden/0/a"]
    != fingerprints({"p": saved[1][0]})["p"]["hidden/0/a"]
  )


@pytest.mark.parametrize("how", ["flip", "truncate", "delete", "metadata"])
def test_corrupt_step_is_quarantined_and_its_number_saved_again(tmp_path, caplog, how):
  directory = tmp_path / "checkpoints"
  saved = _save(directory)
  _corrupt(directory / "2", how)
  checkpoints = Checkpoints(str(directory), writable=True)  # as the trainer: restore, then save
  step, params, train, _ = checkpoints.restore(*map(abstract_tree, _trees(0)))
  assert step == 1 and _same(params, saved[1][0]) and _same(train, saved[1][1])
  quarantined = tmp_path / "quarantine" / "2"
  assert quarantined.is_dir() and not (directory / "2").exists()
  assert "step 2" in caplog.text and f"moved it to {quarantined}" in caplog.text
  assert checkpoints.steps() == [1]
  checkpoints.save(2, *saved[2], {"param_shapes": param_shapes(saved[2][0])})
  checkpoints.wait()
  checkpoints.close()
  step, params, _, _ = _restore(directory, writable=True)
  assert step == 2 and _same(params, saved[2][0])


def test_checksum_mismatch_alone_makes_a_step_unreadable(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _save(directory)
  _edit_metadata(directory / "2", lambda m: m["checksums"]["train"].update(mu="0" * 16))
  assert _restore(directory, writable=False)[0] == 1
  assert "checksum mismatch in 1 arrays: train/mu" in caplog.text
  assert (directory / "2").is_dir() and not (tmp_path / "quarantine").exists()  # read-only
  assert _restore(directory, writable=True)[0] == 1
  assert (tmp_path / "quarantine" / "2").is_dir()
  # A second quarantine of the same step number keeps both, the newer one time-stamped.
  _save(directory, steps=(2,))
  _edit_metadata(
    directory / "2", lambda m: m["checksums"]["params"].update({"hidden/0/a": "0" * 16})
  )
  assert _restore(directory, writable=True)[0] == 1
  names = sorted(os.listdir(tmp_path / "quarantine"))
  assert len(names) == 2 and names[0] == "2" and names[1].startswith("2.")


def test_read_only_falls_back_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  saved = _save(directory)
  _corrupt(directory / "2", "flip")
  listing = sorted(os.listdir(directory))
  step, params, _, _ = _restore(directory, writable=False)
  assert step == 1 and _same(params, saved[1][0])
  assert sorted(os.listdir(directory)) == listing and sorted(os.listdir(tmp_path)) == [
    "checkpoints"
  ]
  with pytest.raises(CheckpointError, match=r"(?s)step 2 of .* is unreadable.*available steps"):
    _restore(directory, writable=False, step=2)


def test_every_step_bad(tmp_path, caplog):
  directory = tmp_path / "checkpoints"
  _save(directory)
  _corrupt(directory / "2", "truncate")
  _corrupt(directory / "1", "flip")
  with pytest.raises(CheckpointError, match=r"(?s)no readable checkpoint.*step 2.*step 1"):
    _restore(directory, writable=False)
  assert _restore(directory, writable=True) is None
  assert sorted(os.listdir(tmp_path / "quarantine")) == ["1", "2"]
  assert "starting from scratch" in caplog.text
  assert Checkpoints(str(directory)).steps() == []


def test_explicit_step(tmp_path):
  directory = tmp_path / "checkpoints"
  saved = _save(directory)
  step, params, train, metadata = _restore(directory, writable=False, step=1)
  assert step == 1 and _same(params, saved[1][0]) and _same(train, saved[1][1])
  assert Checkpoints(str(directory)).metadata(step=1)["checksums"] == metadata["checksums"]
  with pytest.raises(CheckpointError, match=r"no step 5 .*available steps: \[1, 2\]"):
    _restore(directory, writable=False, step=5)


def test_wrong_model_raises_and_moves_nothing(tmp_path):
  directory = tmp_path / "checkpoints"
  _save(directory)
  with pytest.raises(
    CheckpointError,
    match=r"(?s)another model.*hidden/0/a: checkpoint "
    r"\[32, 32\] vs now \[16, 32\]",
  ):
    _restore(directory, writable=True, params_like=_trees(0, width=16)[0])
  # An exported checkpoint (no training state) asked for one: also not a corrupt step.
  exported = tmp_path / "export"
  _save(exported, train=False)
  with pytest.raises(CheckpointError, match=r"holds no \['train'\] state"):
    _restore(exported, writable=True)
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "export"]
  assert Checkpoints(str(directory)).steps() == [1, 2]


def test_old_and_cast_checkpoints_restore_without_false_alarms(tmp_path):
  directory = tmp_path / "checkpoints"
  saved = _save(directory)
  # Restored into another dtype (orbax casts): fingerprints differ, but nothing is corrupt.
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), saved[2][0])
  step, restored, _, _ = _restore(directory, writable=True, params_like=params)
  assert step == 2 and restored["hidden"][0]["a"].dtype == jnp.bfloat16
  # Written before checksums: restored unverified.
  _edit_metadata(directory / "2", lambda m: m.pop("checksums"))
  assert _restore(directory, writable=True)[0] == 2
  assert not (tmp_path / "quarantine").exists()


def test_max_to_keep_must_be_positive(tmp_path):
  with pytest.raises(ValueError, match=r"train.max_to_keep=0 must be ≥ 1"):
    Checkpoints(str(tmp_path / "checkpoints"), max_to_keep=0)


_HOLDER = """
import sys, time
from nsn_jax.workdir import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(60)
"""


def test_workdir_lock_refuses_a_second_run_and_recovers_from_a_killed_one(tmp_path):
  workdir = str(tmp_path / "run" / "work")
  with (
    WorkdirLock(workdir),
    pytest.raises(
      WorkdirLockedError,
      match=rf"pid {os.getpid()} on host .* is using "
      rf"{workdir}; wait for it or use another --workdir",
    ),
  ):
    WorkdirLock(workdir).__enter__()
  with WorkdirLock(workdir):  # released on exit
    pass
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, workdir], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with (
      pytest.raises(WorkdirLockedError, match=rf"another run \(pid {holder.pid} on host "),
      WorkdirLock(workdir),
    ):
      pass
    with open(os.path.join(workdir, ".lock")) as f:
      assert json.load(f)["pid"] == holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  finally:
    holder.kill()
    holder.stdout.close()
  # The kernel dropped the dead holder's lock.
  with WorkdirLock(workdir) as lock, open(lock.path) as f:
    assert json.load(f)["pid"] == os.getpid()
