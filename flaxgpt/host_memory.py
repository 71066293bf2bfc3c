"""The host allocator under XLA:CPU: each step reuses the memory the last step freed.

XLA:CPU mallocs each execution's temporaries as one block; glibc serves blocks over 32 MB with a
fresh mmap, so every train step faulted the whole block in again. `keep_freed_memory` has glibc
serve them from its heaps and keep what is freed (docs/performance.md: how far it reaches, and
the figures). `train()` applies it on CPUs; an allocator preloaded in glibc's place or a malloc
setting in the environment is left alone (GLIBC_TUNABLES=glibc.malloc.check=0 keeps glibc's own).
"""

import ctypes
import functools
import os
import platform

# mallopt(3) parameters (glibc's <malloc.h>) -> values
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = {
    M_MMAP_MAX: 0,  # blocks come from the heaps, not from a fresh mmap each time
    M_TRIM_THRESHOLD: 2**31 - 1,  # the main heap's free top is kept (trimmed only past 2 GiB)
    # a thread heap's size on 64-bit: glibc never deletes an emptied thread heap
    M_TOP_PAD: 64 << 20,
}


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next XLA:CPU execution (once per process) -> whether
    mallopt was called: False off glibc, under a preloaded allocator, or when the environment
    already tunes malloc."""
    if platform.libc_ver()[0] != "glibc" or user_tunes_malloc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())


def user_tunes_malloc() -> bool:
    """Whether the environment sets glibc's malloc up itself or preloads another allocator."""
    return (any(name.startswith("MALLOC_") for name in os.environ)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
            or "malloc" in os.environ.get("LD_PRELOAD", ""))  # jemalloc, tcmalloc, mimalloc...
