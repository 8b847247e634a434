"""scripts/tpu_launch.sh against a fake `gcloud` on PATH: the remote command parses, starts
train.py detached with every flag intact (tuples included), and relaunch repeats it."""

import os
import pathlib
import subprocess
import sys
import time

import cluster

REPO = pathlib.Path(__file__).resolve().parent.parent
TUPLE = "--config.ranks.fixed=(32,16,8,4)"
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$CALLS/$(ls "$CALLS" | wc -l)"
"""


def _launcher(tmp_path, *args) -> list[list[str]]:
  """Runs the launcher; returns each gcloud call's arguments."""
  calls, bin_dir = tmp_path / "calls", tmp_path / "bin"
  calls.mkdir(exist_ok=True)
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  before = len(list(calls.iterdir()))
  env = {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "CALLS": str(calls),
    "NSN_LAUNCH_DIR": str(tmp_path / "launches"),
  }
  proc = subprocess.run(
    ["bash", "scripts/tpu_launch.sh", *args], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr
  made = sorted(calls.iterdir(), key=lambda p: int(p.name))[before:]
  return [p.read_text().split("\0")[:-1] for p in made]


def _remote_command(call: list[str]) -> str:
  assert call[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in call
  return next(a for a in call if a.startswith("--command=")).removeprefix("--command=")


def _run_on_fake_worker(command: str, home: pathlib.Path) -> list[str]:
  """Runs the remote command in a fake worker home whose python records its argv."""
  venv = home / "nsn_jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "pip").write_text("#!/bin/sh\n")
  (venv / "python").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$HOME/argv"\n')
  for stub in ("pip", "python"):
    (venv / stub).chmod(0o755)
  subprocess.run(["tar", "-czf", home / "nsn_jax.tgz", "-T", "/dev/null"], check=True)
  (home / "nsn_jax" / "requirements").mkdir()
  env = {**os.environ, "HOME": str(home)}
  subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
  deadline = time.monotonic() + 30  # train.py was started in the background
  while not (home / "argv").exists():
    assert time.monotonic() < deadline, "train.py never started"
    time.sleep(0.1)
  time.sleep(0.2)
  return (home / "argv").read_text().splitlines()


def test_launch_starts_train_py_detached_with_flags_intact(tmp_path):
  flags = [
    "--config=configs/cifar10_mlp.py",
    TUPLE,
    "--config.model.hidden=(512, 512)",
    "--config.data.name=it's",
    "--config.data.data_dir=gs://b/tfds dir",
  ]
  scp, ssh = _launcher(tmp_path, "launch", "nsn", "us-central2-b", "gs://b/runs/x", *flags)
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  command = _remote_command(ssh)
  assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
  assert "setsid nohup" in command and "~/nsn_jax_logs/x.log" in command
  argv = _run_on_fake_worker(command, tmp_path / "worker")
  metrics = f"--metrics_dir={tmp_path}/worker/nsn_jax_metrics/x"
  assert argv == ["train.py", "--multihost", metrics, "--workdir=gs://b/runs/x", *flags]

  # After a preemption: the same flags, from the saved copy.
  _, again = _launcher(tmp_path, "relaunch", "nsn", "us-central2-b", "gs://b/runs/x")
  assert _remote_command(again) == command
  for action in ("logs", "stop"):
    (call,) = _launcher(tmp_path, action, "nsn", "us-central2-b", "gs://b/runs/x")
    assert subprocess.run(["bash", "-n", "-c", _remote_command(call)]).returncode == 0


PROFILED = """
import socket, sys
import jax
from absl import flags
from nsn_jax import cli
apply = cli.launch_flags()
flags.FLAGS(sys.argv)
apply()
socket.create_connection(("127.0.0.1", flags.FLAGS.profiler_port), timeout=5).close()
print("cache", jax.config.jax_compilation_cache_dir)
"""


def test_launch_flags_serve_the_profiler_and_set_the_compilation_cache(tmp_path):
  port, coordinator = cluster.free_port(), cluster.free_port()
  # Joined to a (one-process) cluster: the profiler must start after jax.distributed does.
  joined = [f"--coordinator_address=127.0.0.1:{coordinator}", "--num_processes=1", "--process_id=0"]
  proc = subprocess.run(
    [sys.executable, "-c", PROFILED, f"--profiler_port={port}", f"--compilation_cache={tmp_path}"]
    + joined,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]  # the profiler server accepted a connection
  assert f"cache {tmp_path}" in proc.stdout
