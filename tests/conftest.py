"""Test set-up: 8 fake CPU devices, configured before jax is imported anywhere.

PJRT_NPROC=16 keeps collectives on 2-core machines from deadlocking (see environment docs); the
terminate timeout turns such a hang into a fast failure.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=30")
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
