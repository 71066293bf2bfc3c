"""The host allocator under XLA:CPU: each step reuses the memory the last step freed.

XLA:CPU takes the temporary buffers of each execution from malloc as one block and frees it when
the execution ends. glibc serves blocks over 32 MB (the highest its adaptive mmap threshold goes)
with a fresh mmap and unmaps them on free, so once a model's block crossed 32 MB every train step
faulted in the whole block as new zeroed pages, in kernel time (docs/performance.md has the
figures). `keep_freed_memory` tells glibc to serve large blocks from its heaps and to keep what is
freed there.

How far it reaches: XLA runs steps on its pool threads, and each thread allocates from its own glibc
heap (an "arena"). Each arena faults its block in once, the first time its thread runs a step, and
keeps it: the first few steps still fault, and the process holds about one block per thread that ran
a step (more threads hold more). A thread heap is at most 64 MB, so a block larger than that still
comes from a fresh mmap every time: bigger CPU models or batches gain nothing. Freed memory stays in
the process, and large calloc/np.zeros blocks reused from a heap are zeroed at once rather than page
by page.

`train()` applies it when it trains on CPUs (and bench.py before timing a CPU step); nothing does on
import or when a TrainStep is built. Only glibc's malloc is tuned. An allocator preloaded in its
place (jemalloc, tcmalloc) or any glibc malloc setting in the environment (a MALLOC_* variable,
glibc.malloc in GLIBC_TUNABLES) leaves malloc as it is: to keep glibc's own behaviour, set
GLIBC_TUNABLES=glibc.malloc.check=0 (glibc's default, which changes nothing else).
"""

import ctypes
import functools
import os
import platform

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: the main heap's free top is trimmed only past 2 GiB
TOP_PAD = 64 << 20  # glibc's thread heap size on 64-bit (twice its 32 MB highest mmap threshold)
SETTINGS = {
    M_MMAP_MAX: 0,  # blocks come from the heaps, not from a fresh mmap each time
    M_TRIM_THRESHOLD: NEVER_TRIM,  # the main heap's free top is kept for the next block
    # glibc deletes an emptied thread heap only when the heap before it has the pad free: with a
    # whole heap's size, never. Each new thread heap is then committed at 64 MB; the main heap grows
    # by the pad past each request.
    M_TOP_PAD: TOP_PAD,
}


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next XLA:CPU execution (once per process).

    -> whether mallopt was called: False off glibc, under a preloaded allocator, or when the
    environment already tunes malloc.
    """
    if platform.libc_ver()[0] != "glibc" or user_tunes_malloc():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())


def user_tunes_malloc() -> bool:
    """Whether the environment sets glibc's malloc up itself or preloads another allocator."""
    if any(name.startswith("MALLOC_") for name in os.environ):
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return "malloc" in os.environ.get("LD_PRELOAD", "")  # jemalloc, tcmalloc, mimalloc...
