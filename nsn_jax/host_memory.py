"""Host memory reuse for XLA:CPU: keep freed heap memory instead of returning it to the OS.

XLA:CPU allocates each program's temporaries with malloc on every call. glibc serves blocks
above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) with fresh mmaps and
gives freed heap back to the OS above its trim threshold, so a train step's megabyte-sized
activations are page-faulted and zeroed anew on every step. On the demo MLP's 11-rank step at
batch 1024 (one core) that was more than half the step time (docs/benchmarks.md).
`keep_freed_memory` sets both thresholds high, so the blocks freed by one step serve the next.
Call it before the first JAX computation, as the CLIs do (`--keep_host_memory`, on by default):
called after JAX's CPU client had started and allocated, it left that step as slow as before
(28.6 ms against 12.8 ms, same run). The cost: the process's resident memory stays at its peak
(the peak itself does not change).
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: larger blocks are still mmapped
TOP_PAD = 256 * 2**20  # heap grown ahead of need, so a step's first allocations find room
TRIM_THRESHOLD = 2**31 - 1  # never hand freed heap back (mallopt takes an int)
# The same settings as glibc reads them from the environment when a process starts (for one that
# does not call `keep_freed_memory` itself, e.g. the PyTorch benchmark worker).
ENVIRONMENT = {
  "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
  "MALLOC_TOP_PAD_": str(TOP_PAD),
  "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed memory (see module); True if it took effect, False
  where the C library is not glibc (macOS, musl), which is left as it is."""
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return False
  settings = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    (_M_TOP_PAD, TOP_PAD),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
  )
  return all(mallopt(parameter, value) == 1 for parameter, value in settings)
