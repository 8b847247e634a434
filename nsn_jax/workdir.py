"""One run per workdir: an exclusive lock held for the life of the run.

The lock is `fcntl.flock` on `<workdir>/.lock`. The kernel drops a flock when its holder exits,
however it exits (SIGKILL, out of memory, a crashed host process), so a lock file left behind by
a killed run is stale by construction: the next run simply takes it. The file is never deleted
(deleting would let two runs lock two different files of the same name); it only records who
holds it, for the error message. flock is advisory and local: it guards a local (or NFS)
directory against runs that also use this lock, and cannot lock gs://… paths.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys


class WorkdirLockedError(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds `<workdir>/.lock` (created with its parents) or raises
  WorkdirLockedError naming the holder. Not reentrant: a second lock of the same directory is
  refused even in the same process."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    self.path = os.path.join(self.directory, ".lock")
    self._file = None

  def __enter__(self) -> WorkdirLock:
    os.makedirs(self.directory, exist_ok=True)
    # Opened without truncating: the holder's record must survive a refused attempt.
    f = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(f.read())
      f.close()
      raise WorkdirLockedError(
        f"another run (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}) is using {self.directory}; wait for it or use "
        "another --workdir"
      ) from None
    f.truncate(0)
    json.dump(
      {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
      },
      f,
    )
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _parse(text: str) -> dict:
  """The holder's record; {} while it is still being written."""
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}
