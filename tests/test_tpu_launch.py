"""scripts/tpu_launch.sh against a fake `gcloud` on PATH: the remote command is valid shell and
passes every train.py flag through as one argument, tuples included."""

import os
import shlex
import stat
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
  "--config=configs/default.py",
  "--config.ranks.fixed=(32,16,8,4)",
  "--config.model.hidden=(512, 512)",
  "--config.data.name=it's",
]


def test_remote_command_quotes_every_flag(tmp_path):
  calls = tmp_path / "calls"
  calls.mkdir()
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  # Records each call's arguments, NUL-separated, in a file of its own.
  fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$(mktemp -p {calls})"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
  subprocess.run(
    ["bash", "scripts/tpu_launch.sh", "my-tpu", "us-central2-b", "gs://bucket/runs/demo", *FLAGS],
    cwd=REPO,
    env=env,
    check=True,
    timeout=120,
  )
  ssh = next(args for f in calls.iterdir() if "ssh" in (args := f.read_text().split("\0")))
  command = next(a for a in ssh if a.startswith("--command="))[len("--command=") :]
  subprocess.run(["bash", "-n", "-c", command], check=True)  # the remote shell parses it
  train_line = next(line for line in command.splitlines() if "train.py" in line)
  words = shlex.split(train_line.replace("$HOME", "/home/me"))
  assert words[words.index("train.py") + 1 :] == [
    "--multihost",
    "--metrics_dir=/home/me/nsn_metrics/demo",
    "--workdir=gs://bucket/runs/demo",
    *FLAGS,
  ]
