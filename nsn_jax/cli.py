"""What every command-line tool shares: one-line errors with exit code 2, and --verbose.

Bad input (a config field, a path, a rank, a checkpoint) is reported as `tool: error: message`
with exit code 2 and no traceback; a diverged run as `tool: error: ...` with exit code 1.
`--verbose` shows the traceback as well.
"""

from __future__ import annotations

from collections.abc import Callable
import os
import sys
import traceback

from absl import app, flags, logging
import jax

from nsn_jax import distributed, host_memory
from nsn_jax.checkpoint import CheckpointError
from nsn_jax.train_lib import StoppedEarly
from nsn_jax.workdir import WorkdirLockedError

# Every check of user input in nsn_jax raises ValueError (ConfigError and DatasetNotFoundError
# among them) or one of these. An unexpected ValueError is shown the same way (most often it too
# is a value the user gave); --verbose shows where it came from.
USER_ERRORS = (
  ValueError,
  CheckpointError,
  WorkdirLockedError,
  FileNotFoundError,
  NotADirectoryError,
  IsADirectoryError,
  PermissionError,
)


def _fail(error: BaseException, code: int) -> None:
  if flags.FLAGS.verbose:
    if not distributed.in_cluster():
      raise error
    traceback.print_exception(error)
  print(f"{os.path.basename(sys.argv[0])}: error: {_one_line(error)}", file=sys.stderr)
  _exit(code, _one_line(error))


def _exit(code: int, message: str) -> None:
  """Exits; in a cluster, first tells the other processes why (`distributed.announce_failure`)
  and then skips JAX's exit-time shutdown barrier, which would wait minutes for processes that
  are still running."""
  if not distributed.in_cluster():
    sys.exit(code)
  try:
    distributed.announce_failure(message)
  finally:  # even when the coordination service is already gone
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# JAX's persistent compilation cache, on by default in every CLI: a rerun (a new prompt length,
# a resumed run, another sweep) loads its programs instead of compiling them.
DEFAULT_CACHE = os.path.join(
  os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
  "nsn_jax",
  "xla",
)


def compilation_cache_flag(help_text: str) -> flags.FlagHolder:
  """--compilation_cache, DEFAULT_CACHE unless given ('' turns it off)."""
  return flags.DEFINE_string("compilation_cache", DEFAULT_CACHE, f"{help_text} ('' = off)")


def use_compilation_cache(directory: str) -> None:
  if directory:
    jax.config.update("jax_compilation_cache_dir", directory)


def launch_flags() -> Callable[[], None]:
  """Defines the flags every process of a launch shares (cluster membership, the persistent
  compilation cache, the profiler server); returns the function that applies them (call it
  first in `main`)."""
  multihost = flags.DEFINE_bool(
    "multihost", False, "Join a cluster that JAX discovers itself (Cloud TPU VM pod slices, SLURM)."
  )
  coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  processes = flags.DEFINE_integer("num_processes", None, "Processes in the cluster.")
  process_id = flags.DEFINE_integer("process_id", None, "This process's index.")
  timeout = flags.DEFINE_float(
    "cluster_timeout",
    600.0,
    "Seconds a process waits for the others to join or to reach a barrier before it stops "
    "with an error naming the missing processes.",
  )
  heartbeat = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds before JAX declares a silent process dead."
  )
  cache = compilation_cache_flag(
    "JAX's persistent compilation cache directory (local or gs://, shared by every host): a "
    "relaunch loads its programs instead of compiling them"
  )
  keep_memory = flags.DEFINE_bool(
    "keep_host_memory",
    True,
    "Let malloc keep freed host memory for reuse instead of returning it to the OS "
    "(nsn_jax.host_memory): XLA:CPU steps then stop page-faulting their temporaries anew "
    "(2.2x faster on the demo's step at batch 1024); resident memory stays at its peak.",
  )
  profiler_port = flags.DEFINE_integer(
    "profiler_port",
    0,
    "Serve jax.profiler on this port (0: off), so TensorBoard's profile tab can capture a "
    "trace of the running job.",
    lower_bound=0,
  )

  def apply() -> None:
    if keep_memory.value:
      host_memory.keep_freed_memory()
    use_compilation_cache(cache.value)
    distributed.initialize(  # before anything starts a JAX backend (the profiler does)
      multihost.value,
      coordinator.value,
      processes.value,
      process_id.value,
      timeout.value,
      heartbeat.value,
    )
    if profiler_port.value:
      jax.profiler.start_server(profiler_port.value)

  return apply


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, config file or `--config.a.b=v` override (unknown
  field, wrong type) as one line and exit code 2."""
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:  # a config file that failed to load says so on first access
      value = flags.FLAGS[name].value
      if type(value).__name__ == "_ErrorConfig":
        value.keys()
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if any(arg.lstrip("-").lower() in ("verbose", "verbose=true", "verbose=1") for arg in argv):
      raise
    print(f"{os.path.basename(argv[0])}: error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)


def _one_line(error: BaseException) -> str:
  """ml_collections' override errors nest quoted reprs ("'\\'x\\'\\nDid you mean...'")."""
  # A KeyError's str() is the repr of its key; other errors' str() is their message.
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  if "Traceback (most recent call last)" in text:  # a config file's own error, with its trace
    text = text.strip().splitlines()[-1].split(": ", 1)[-1]  # without "ValueError: "
  while len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
    text = text[1:-1].encode().decode("unicode_escape")
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run(main: Callable[[], None]) -> None:
  """Runs `main()` under absl (orbax's per-file INFO logs silenced) with one-line errors.
  Defines --verbose here, not at import, so importing a CLI module adds no flags."""
  if "verbose" not in flags.FLAGS:
    flags.DEFINE_bool("verbose", False, "On an error, show the full traceback too.")

  def _main(argv):
    if len(argv) > 1:
      _fail(ValueError(f"unexpected arguments {argv[1:]}: every option is --name=value"), 2)
    logging.set_verbosity(logging.WARNING)
    try:
      main()
    except StoppedEarly as e:  # saved; not a failure
      print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
    except USER_ERRORS as e:
      _fail(e, 2)
    except (FloatingPointError, distributed.ClusterError) as e:  # a diverged run keeps its
      _fail(e, 1)  # last good checkpoint; a cluster error names the process that failed
    except Exception as e:  # unexpected: the traceback, and in a cluster the others are told
      if not distributed.in_cluster():
        raise
      traceback.print_exc()
      _exit(1, f"{type(e).__name__}: {_one_line(e)}")

  app.run(_main, flags_parser=_parse_flags)
