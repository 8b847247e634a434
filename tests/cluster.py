"""Localhost multi-process JAX clusters for tests: N processes joined through a coordinator on a
free port, each with its own fake CPU devices and log file, all killed at a deadline so a hang
fails the test instead of CI."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Cluster:
  """`n` processes of `argv + cluster flags`, started at once; `wait()` collects them."""

  def __init__(self, argv: list[str], n: int, devices: int, logs: pathlib.Path, extra=None):
    """`extra(i)`: more arguments for process i (e.g. its own workdir)."""
    port = free_port()
    env = {
      **os.environ,
      "PYTHONPATH": str(REPO),
      "PJRT_NPROC": "16",
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    logs.mkdir(parents=True, exist_ok=True)
    self.logs = [logs / f"process{i}.log" for i in range(n)]
    self.procs = []
    for i in range(n):
      cluster_flags = [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={n}",
        f"--process_id={i}",
      ]
      with open(self.logs[i], "w") as log:
        self.procs.append(
          subprocess.Popen(
            [sys.executable, *argv, *cluster_flags, *(extra(i) if extra else [])],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )

  def signal(self, i: int, signum=signal.SIGTERM) -> None:
    self.procs[i].send_signal(signum)

  def wait(self, timeout: float) -> list[tuple[int, str]]:
    """(exit code, log) per process; kills them all and fails if any outlives `timeout`."""
    deadline = time.monotonic() + timeout
    for p in self.procs:
      try:
        p.wait(max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        for q in self.procs:
          q.kill()
        raise AssertionError(
          f"the cluster outlived {timeout} s:\n" + "\n".join(log[-2000:] for _, log in self._read())
        ) from None
    return self._read()

  def _read(self) -> list[tuple[int, str]]:
    return [(p.returncode, path.read_text()) for p, path in zip(self.procs, self.logs)]


def train(workdir, data_dir, n: int, devices: int, *flags: str, extra=None) -> Cluster:
  """train.py on configs/default.py:smoke (log every step) in `workdir` on a new cluster."""
  argv = [
    "train.py",
    "--config=configs/default.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.train.log_every=1",
    *flags,
  ]
  return Cluster(argv, n, devices, pathlib.Path(f"{workdir}.logs"), extra)
