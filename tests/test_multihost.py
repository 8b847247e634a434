"""Multi-process clusters on localhost that must fail loudly, never hang or train on wrong data:
a mesh that leaves out a process, a workdir not every host sees, hosts with other configs, a
process that fails or goes missing, and preemption that reaches one host only. Every cluster is
killed at a deadline (`cluster.Cluster.wait`)."""

import json
import signal
import textwrap
import time

import cluster
import numpy as np
import pytest

from nsn_jax.train_lib import train_and_evaluate


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/total_loss"] for r in rows if "train/total_loss" in r}


def _all_fail(run, code, *needles, timeout=120):
  """Every process stops with the error: found itself (exit `code`), or, when it was already
  waiting at a barrier, told by the process that found it ("process N stopped: ...", exit 1).
  On a loaded machine either can come first."""
  for got, log in run.wait(timeout):
    told = got == 1 and "stopped: " in log
    assert got == code or told, log[-3000:]
    for needle in needles:
      assert needle in log, log[-3000:]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, data_dir):
  """Three 2-process clusters that must be refused, started together (they run concurrently):
  a mesh that leaves out process 1, a workdir per process (what a host-local path on a pod
  looks like), and a process launched with another config."""
  root = tmp_path_factory.mktemp("refused")
  clusters = {
    "mesh": cluster.train(root / "mesh", data_dir, 2, 2, "--config.mesh.data=2"),
    "unshared": cluster.train(
      root / "unshared", data_dir, 2, 1, extra=lambda i: [f"--workdir={root}/local{i}"]
    ),
    "config": cluster.train(
      root / "config", data_dir, 2, 1, extra=lambda i: [f"--config.seed={i}"]
    ),
  }
  return root, clusters


def test_a_mesh_that_leaves_out_a_process_is_an_error_on_every_process(refused):
  root, clusters = refused
  _all_fail(clusters["mesh"], 2, "mesh=", "leaving out every device of process(es) [1]")
  assert not (root / "mesh" / "checkpoints").exists()


def test_a_workdir_that_not_every_host_sees_is_refused_before_training(refused):
  root, clusters = refused
  _all_fail(clusters["unshared"], 2, "process(es) [1] cannot see the file process 0 wrote there")
  assert not any((root / f"local{i}" / "checkpoints").exists() for i in range(2))


def test_hosts_with_another_config_are_refused(refused):
  _, clusters = refused
  _all_fail(clusters["config"], 1, "process(es) [1] run another config than process 0")


BARRIERS = textwrap.dedent(
  """
  import sys, time
  from absl import flags
  from nsn_jax import cli, distributed
  join = cli.launch_flags()
  flags.FLAGS(sys.argv)
  join()
  distributed.barrier("start")
  if flags.FLAGS.process_id == 1:
    time.sleep(3)
    distributed.announce_failure("its data directory is unreadable", wait_s=30)
    sys.exit(0)
  for name, timeout in (("never", 1), ("later", 60)):
    try:
      distributed.barrier(name, timeout_s=timeout)
    except distributed.ClusterError as e:
      print("ClusterError:", e, flush=True)
  """
)


def test_barriers_name_the_process_that_failed_or_went_missing(tmp_path):
  run = cluster.Cluster(["-c", BARRIERS], 2, 1, tmp_path)
  (_, waiting), _ = run.wait(timeout=120)
  # Process 1 never reaches "never": named after the 1 s timeout, not waited on forever.
  assert "process(es) [1] did not reach 'never' within 1 s (this is process 0)" in waiting
  # It then announces its failure: process 0 stops at its next barrier with the reason.
  assert "ClusterError: process 1 stopped: its data directory is unreadable" in waiting


@pytest.mark.slow
def test_four_processes_preempted_on_one_resume_to_the_single_process_losses(
  smoke_config, tmp_path, data_dir
):
  """4 processes × 1 device, data=2 × tensor=2 (each tensor pair spans two processes). SIGTERM
  reaches process 2 only; all four save the same step and exit 0; the resumed run's losses
  equal one process's uninterrupted run."""
  mesh = ("--config.mesh.data=2", "--config.mesh.tensor=2", "--config.train.steps=40")
  workdir = tmp_path / "cluster"
  run = cluster.train(workdir, data_dir, 4, 1, *mesh)
  deadline = time.monotonic() + 240
  while not (workdir / "metrics.jsonl").exists() or len(_losses(workdir)) < 8:
    assert time.monotonic() < deadline, "the cluster did not reach step 8"
    time.sleep(0.2)
  run.signal(2, signal.SIGTERM)
  results = run.wait(timeout=240)
  stops = set()
  for code, log in results:
    assert code == 0, log[-3000:]
    stops.add(log.split("stopped at step ")[1].split()[0])
  assert len(stops) == 1, stops  # one step, agreed by every process
  stopped = int(stops.pop())
  assert 8 <= stopped < 40 and (workdir / "checkpoints" / str(stopped)).is_dir()

  for code, log in cluster.train(workdir, data_dir, 4, 1, *mesh).wait(timeout=300):
    assert code == 0, log[-3000:]
  reference = smoke_config.copy_and_resolve_references()
  reference.train.log_every, reference.train.steps = 1, 40
  reference.mesh.data, reference.mesh.tensor = 2, 2
  train_and_evaluate(reference, str(tmp_path / "one_process"))
  expected, got = _losses(tmp_path / "one_process"), _losses(workdir)
  assert sorted(got) == list(range(1, 41))
  np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=1e-4)
