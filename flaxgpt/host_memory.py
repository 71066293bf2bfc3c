"""The host allocator under XLA:CPU: each step reuses the memory the last step freed.

XLA:CPU takes the temporary buffers of each execution from malloc as one block (40 MB for the forward +
backward of the README's CPU model) and frees it when the execution ends. glibc serves blocks over 32 MB
(the highest its adaptive mmap threshold goes) with a fresh mmap and unmaps them on free, so every train
step faulted in ~10,000 new zeroed pages: ~20 ms of kernel time on a ~37 ms step, and only from the 4th
layer on, where the block crossed 32 MB (docs/performance.md). `keep_freed_memory` tells glibc to serve
large blocks from its heaps and to keep what is freed there, so the next step finds the same pages already
mapped. 300-step runs of the README's config took 12-22% less time with it. The cost is memory: what the
process holds stays at its high-water mark instead of shrinking between steps, and blocks that no longer
come and go whole leave the heaps more fragmented (those runs peaked 40-110 MB higher, 8-20%).

Only glibc's malloc is tuned: an allocator preloaded in its place (jemalloc, tcmalloc) or malloc settings
the user gave in the environment (MALLOC_*_ or GLIBC_TUNABLES) are left as they are. To keep glibc's own
behaviour, set one: GLIBC_TUNABLES=glibc.malloc.check=0 is glibc's default and changes nothing else.
"""

import ctypes
import functools
import os
import platform

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: free heap tops under 2 GiB are kept
HEAP_MAX_SIZE = 64 << 20  # glibc's per-thread heap size (2 x its 32 MB largest mmap threshold, 64-bit)
SETTINGS = {
    M_MMAP_MAX: 0,  # large blocks come from the heaps, not from a fresh mmap each time
    M_TRIM_THRESHOLD: NEVER_TRIM,  # the main heap's free top is kept for the next block
    M_TOP_PAD: HEAP_MAX_SIZE,  # a thread's heap is deleted only if more than the pad would be left free;
                               # heaps then grow in 64 MB steps of address space (not of memory)
}
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_ARENA_MAX")


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for the next XLA:CPU execution (once per process).

    -> whether the settings were applied: False off glibc, under a preloaded allocator, or when the
    environment already tunes malloc.
    """
    if platform.libc_ver()[0] != "glibc" or _user_tunes_malloc():
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS.items())


def _user_tunes_malloc() -> bool:
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return "malloc" in os.environ.get("LD_PRELOAD", "")  # libjemalloc, libtcmalloc, libmimalloc, ...
