"""Bytes waiting for a slow reader: in memory up to a limit, then on disk, always in order.

A scoring response is produced while the request body is still arriving. Clients such as
curl read the answer as they send; many HTTP libraries send the whole body first. Parking
what they are not reading yet on disk lets both finish without the server's memory growing
with the file.
"""

import asyncio
import os
import tempfile
from collections import deque

_READ_BYTES = 1 << 20


class Outbox:
    def __init__(self, memory_bytes: int) -> None:
        self._limit = memory_bytes
        self._memory: deque[bytes] = deque()
        self._memory_size = 0
        self._spool: int | None = None  # file descriptor of an unlinked temporary file
        self._written = 0
        self._read = 0
        self._writing = 0
        self._ready = asyncio.Event()
        self._closed = False

    async def put(self, data: bytes) -> None:
        if not data:
            return
        # Once parked on disk, later bytes go there too, so that order is kept.
        if self._spool is None and self._memory_size + len(data) <= self._limit:
            self._memory.append(data)
            self._memory_size += len(data)
        else:
            if self._spool is None:
                self._spool, path = tempfile.mkstemp(prefix="modelserve-score-")
                os.unlink(path)
            self._writing += 1
            try:
                await asyncio.to_thread(os.pwrite, self._spool, data, self._written)
            finally:
                self._writing -= 1
            self._written += len(data)
        self._ready.set()

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    async def get(self) -> bytes | None:
        """The next bytes in order, waiting for them; None once closed and empty."""
        while True:
            if self._memory:
                data = self._memory.popleft()
                self._memory_size -= len(data)
                return data
            if self._spool is not None and self._read < self._written:
                size = min(_READ_BYTES, self._written - self._read)
                data = await asyncio.to_thread(os.pread, self._spool, size, self._read)
                self._read += len(data)
                if self._read == self._written and not self._writing:  # caught up: to memory
                    self.discard()
                return data
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()

    def discard(self) -> None:
        if self._spool is not None:
            os.close(self._spool)
            self._spool = None
            self._written = self._read = 0
