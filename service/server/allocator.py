"""A worker's memory: large buffers go back to the operating system when they are freed,
smaller ones are reused, and the cyclic garbage collector runs less often (collect_less_often).

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

import asyncio
import ctypes
import ctypes.util
import gc
from typing import Any

from service.server.memory import MemoryBudget

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 4 << 20
# Seconds without a new inference request after which a worker gives its free heap pages back.
QUIET_S = 5.0


def _glibc(function: str) -> Any:
    """A function of the C library, or None where it has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), function)
    except (OSError, AttributeError, TypeError):
        return None


# Container allocations between two collections of the cyclic garbage collector's youngest
# generation (Python's default: 700). A small request allocates a hundred or so, nearly all
# freed by reference counting when it ends; at 700 a worker under load collected every few
# requests, each time walking the objects of every request in flight, and promoted those to
# the older generations, whose collections walk the whole heap of models and libraries.
GC_YOUNG_THRESHOLD = 10_000


def collect_less_often() -> None:
    """Raise the youngest generation's threshold (the older ones keep theirs): measured on
    single-row requests at 64 connections, 6-10% less CPU a request; the garbage waiting for
    a collection is at most that many objects."""
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


def return_large_buffers() -> None:
    """Pin malloc's mmap and trim thresholds; a no-op where the C library is not glibc."""
    mallopt = _glibc("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


async def give_back_when_quiet(budget: MemoryBudget, quiet_s: float = QUIET_S) -> None:
    """Once no inference request has come for `quiet_s` after some did, every free page of
    the worker's heaps goes back to the operating system, once per burst.

    Buffers below the mmap threshold (bodies and answers under 1 MiB, a connection's reads)
    come from heaps, which give back only their free top, and only past the trim threshold:
    after 1,000 clients each sent 120 KB of a body and left, the workers kept 131 MiB; trimmed
    when quiet, 20 MiB. A busy worker is never trimmed, so it keeps its heaps for the next
    requests (the trim threshold's purpose), and the trim runs in a thread: it takes a few
    milliseconds on a heap of a hundred megabytes.
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return
    trim.argtypes = [ctypes.c_size_t]
    seen, active = budget.taken, False
    while True:
        await asyncio.sleep(quiet_s)
        if budget.taken != seen:
            seen, active = budget.taken, True
        elif active and not budget.reserved:
            active = False
            await asyncio.to_thread(trim, 0)
