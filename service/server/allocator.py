"""Large buffers go back to the operating system when they are freed.

glibc's malloc raises its mmap threshold after each large buffer is freed, up to 32 MiB, and
serves later buffers below it from its heap, which it seldom gives back: after a few large
requests a worker keeps a hundred megabytes it no longer uses. Pinned at 1 MiB, every larger
buffer (request bodies, tensors, answers) gets its own mapping, unmapped when freed.
"""

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_buffers() -> None:
    """Pin malloc's mmap threshold; a no-op where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
