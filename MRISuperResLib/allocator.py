"""Keep freed heap memory in the process instead of handing it back to the system after every tensor.

Why: glibc serves each large tensor from a fresh mmap and unmaps it when it is freed, so every network call on
the CPU faults all its activations in again, page by page. Measured on 2 cores, half the wall time of a
paired-ddpm patch call (64^3, two patches) was kernel time; with freed memory kept, it is about none, and the
call takes half as long. The process's peak memory is unchanged, but it is not returned until the process ends.
So only whole-process entry points (the command line, and through it the Slicer worker) opt in: a library call
inside Slicer's own process leaves Slicer's allocator alone.
"""

import ctypes
import ctypes.util
import os
import sys

OPT_OUT = "MRISUPERRES_KEEP_FREED_MEMORY"  # "0": leave the allocator as it is (to measure the difference)

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True if it took effect (Linux with glibc only)."""
    if os.environ.get(OPT_OUT, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt does nothing
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1 reaches glibc as SIZE_MAX: never trim the heap top; no mmap means large blocks come from the heap too.
    return bool(mallopt(_M_TRIM_THRESHOLD, -1)) and bool(mallopt(_M_MMAP_MAX, 0))
