"""Test set-up: 8 fake CPU devices, configured before jax is imported anywhere.

PJRT_NPROC=16 keeps collectives on 2-core machines from deadlocking (see environment docs); the
terminate timeout turns such a hang into a fast failure.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault(
  "XLA_FLAGS",
  "--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=30",
)
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Caches (parsed GGUF metadata, the CLIs' compilation cache) go to a directory of this run,
# never the user's ~/.cache, and are removed with it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="nsn_jax_test_cache_")

import pytest

atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir shared by the session; mnist5k is prepared into it on first use."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def smoke_config(data_dir):
  """configs/default.py:smoke reading data from the session's data_dir."""
  from configs import default

  config = default.get_config("smoke")
  config.data.data_dir = data_dir
  return config


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
  """A tiny random-weight Llama GGUF file (tests/test_llama.py's TINY): SmolLM2's stand-in."""
  from test_llama import TINY, gguf_weights, tiny_model, write_gguf

  return str(
    write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TINY, gguf_weights(tiny_model()))
  )


@pytest.fixture(scope="session")
def lm_run(tiny_gguf, data_dir, tmp_path_factory):
  """(workdir, final eval metrics) of configs/smollm2_lm.py:smoke on the tiny GGUF, trained once
  per session (vmap_masked multi-rank: the masked path on a decoder) and only read by tests."""
  from configs import smollm2_lm
  from nsn_jax.train_lib import train_and_evaluate

  config = smollm2_lm.get_config("smoke")
  config.model.path, config.data.data_dir = tiny_gguf, data_dir
  config.train.multi_rank = "vmap_masked"
  workdir = tmp_path_factory.mktemp("lm") / "run"
  return str(workdir), train_and_evaluate(config, str(workdir))
