"""eval.py's sweep: rank specs, fresh-process restore, corrupt checkpoints, budgets, outputs."""

import csv
import json
import os
import subprocess
import sys

import cluster
import pytest

from nsn_jax import sharding
from nsn_jax.checkpoint import CheckpointError
from nsn_jax.restore import restore_model
from nsn_jax.sweep import SweepRow, parse_ranks, run_sweep
from nsn_jax.train_lib import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
  """A smoke run (R=8) with checkpoints at steps 10 and 20; final eval at every rank."""
  from configs import default

  config = default.get_config("smoke")
  config.data.data_dir = data_dir
  config.eval.ranks = tuple(range(1, 9))
  workdir = tmp_path_factory.mktemp("trained")
  final = train_and_evaluate(config, str(workdir))
  return str(workdir), final


def test_parse_ranks():
  assert parse_ranks("all", 4) == [1, 2, 3, 4]
  assert parse_ranks("every:3", 8) == [1, 3, 6, 8]
  assert parse_ranks("4, 1,2", 8) == [1, 2, 4]
  for bad, match in (
    ("0,2", r"\[0\].*1..8"),
    ("9", r"\[9\]"),
    ("every:0", "every:N"),
    ("two", "every:N"),
    ("", "every:N"),
  ):
    with pytest.raises(ValueError, match=match):
      parse_ranks(bad, 8)
  assert parse_ranks("all", None) == [] and parse_ranks("9,10", None) == []  # syntax only
  with pytest.raises(ValueError, match="every:N"):
    parse_ranks("1;2", None)


def test_fresh_process_restore_reproduces_training_outputs_at_every_rank(trained):
  workdir, final = trained
  proc = subprocess.run(
    [sys.executable, "eval.py", f"--workdir={workdir}", "--ranks=all"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(os.path.join(workdir, "eval", "step_20", "sweep.json")) as f:
    rows = {r["rank"]: r for r in json.load(f)}
  assert sorted(rows) == list(range(1, 9))
  for rank in range(1, 9):  # losses from the live training state vs the restored one
    assert rows[rank]["loss"] == pytest.approx(final[f"eval/rank_{rank}/loss"], rel=1e-6)
    assert rows[rank]["accuracy"] == final[f"eval/rank_{rank}/accuracy"]
  assert [rows[r]["trained"] for r in range(1, 9)] == [r in (2, 4, 8) for r in range(1, 9)]
  assert (
    "rank trained" in proc.stdout
    and os.path.getsize(os.path.join(workdir, "eval", "step_20", "frontier.png")) > 10_000
  )
  with open(os.path.join(workdir, "eval", "step_20", "sweep.csv")) as f:
    assert len(list(csv.DictReader(f))) == 8


def test_sweep_rows_and_budgets(trained):
  workdir, _ = trained
  rows = run_sweep(workdir, "8", budgets=[0.5], verbose=False)
  by_rank = {r.rank: r for r in rows}
  half = [r for r in rows if r.budget == 0.5]
  assert len(half) == 1 and half[0].flops_frac_max_rank <= 0.5
  assert by_rank[8].flops_frac_max_rank == 1.0
  assert by_rank[8].flops_frac_dense < 1.0  # R=8 is below break-even
  # XLA counts one extra FLOP per hidden ReLU (32 per example) on top of the analytic count.
  for r in rows:
    assert r.xla_flops == pytest.approx(r.flops + 32, rel=1e-3)


def test_data_parallel_sweeps_match_one_device_in_one_process_and_in_a_cluster(trained, tmp_path):
  """eval.py --mesh (one process, 8 devices) and eval.py on a 2-process × 2-device cluster
  (data-parallel over both hosts by default) give the one-device sweep's numbers."""
  workdir, _ = trained
  one = {r.rank: r for r in run_sweep(workdir, "2,8", verbose=False, out=str(tmp_path / "one"))}
  mesh = sharding.make_mesh(sharding.parse_mesh("data=4, tensor=2"))
  spread = run_sweep(workdir, "2,8", verbose=False, out=str(tmp_path / "mesh"), mesh=mesh)
  argv = ["eval.py", f"--workdir={workdir}", "--ranks=2,8", f"--out={tmp_path}/cluster"]
  for code, log in cluster.Cluster(argv, 2, 2, tmp_path / "logs").wait(timeout=300):
    assert code == 0, log[-3000:]
  in_cluster = json.loads((tmp_path / "cluster" / "sweep.json").read_text())
  for row in [*spread, *(SweepRow(**r) for r in in_cluster)]:
    assert row.accuracy == one[row.rank].accuracy
    assert row.loss == pytest.approx(one[row.rank].loss, rel=1e-5)
  with pytest.raises(ValueError, match=r"--mesh='data:2': valid: axis=size pairs"):
    sharding.parse_mesh("data:2")


def test_bad_ranks_and_budgets_are_clear_cli_errors(trained):
  workdir, _ = trained
  for args, message in (
    (["--ranks=0,9"], "ranks [0, 9] are outside; valid: ranks in this model's range 1..8"),
    (["--budgets=0.01"], "below the cost of rank 1"),
  ):
    proc = subprocess.run(
      [sys.executable, "eval.py", f"--workdir={workdir}", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr


def test_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="train first"):
    restore_model(str(tmp_path))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
  workdir, _ = trained
  copy = tmp_path / "copy"
  subprocess.run(["cp", "-r", workdir, str(copy)], check=True)
  for root, _, files in os.walk(copy / "checkpoints" / "20" / "params"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  _, _, step = restore_model(str(copy))
  assert step == 10
  for root, _, files in os.walk(copy / "checkpoints" / "10" / "params"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(CheckpointError, match=r"(?s)no readable checkpoint.*step 20.*step 10"):
    restore_model(str(copy))


def test_a_dense_reference_brings_its_svd_truncation_at_every_swept_rank(trained, tmp_path):
  from configs import default
  from nsn_jax.sweep import budget_x

  workdir, _ = trained
  config = default.get_config("smoke,dense")
  config.data.data_dir = restore_model(workdir).config.data.data_dir
  dense_dir = str(tmp_path / "dense")
  train_and_evaluate(config, dense_dir)
  rows = run_sweep(
    workdir, "2,8", budgets=[0.5], references=[dense_dir], verbose=False, out=str(tmp_path / "o")
  )
  by_model = {}
  for row in rows:
    by_model.setdefault(row.model.split(":")[0], {})[row.rank] = row
  assert set(by_model) == {"nsn", "dense", "dense+svd"}
  svd, nsn = by_model["dense+svd"], by_model["nsn"]
  # Every swept rank: 2, 8 and the rank the budget maps to.
  assert sorted(svd) == sorted(nsn) and not any(r.trained for r in svd.values())
  for rank in nsn:  # the same layers at the same rank: equal FLOPs
    assert svd[rank].flops == nsn[rank].flops
  assert by_model["dense"][None].flops_frac_dense == 1.0
  # A budget of the max-rank model's FLOPs lies at that fraction of R's cost on the x axis.
  half = next(r for r in rows if r.budget == 0.5)
  assert budget_x(half, "max_rank") == pytest.approx(0.5 * nsn[8].flops_frac_dense)
  assert budget_x(half, "dense") == 0.5
