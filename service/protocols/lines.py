"""CSV and NDJSON bodies as blocks of whole lines, cut from a byte stream as it arrives."""

import numpy as np

from service.errors import InvalidInput

# Lines are cut into blocks of at most this many bytes (or one row, if longer), whatever the
# rows per chunk: wide rows must not make a chunk of `chunk_rows` rows unbounded.
BLOCK_BYTES = 16 << 20


class LineChunks:
    """Cuts a byte stream into blocks of whole lines, after an optional header.

    A block holds at most `rows` lines, or fewer when they reach `block_bytes`. A line longer
    than `max_row_bytes` is refused as soon as that many bytes of it have arrived, so one
    line without an end is never held whole. `first_row` counts the rows before the stream,
    for the error to name the row in the whole file.
    """

    def __init__(
        self,
        rows: int,
        max_row_bytes: int,
        header: bool = False,
        first_row: int = 0,
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        self._rows = rows
        self._max_row_bytes = max_row_bytes
        self._block_bytes = max(block_bytes, max_row_bytes)
        self._buffer = bytearray()
        self._lines = 0  # whole lines in the buffer
        self._partial = 0  # bytes of the buffer after its last newline
        self._done = first_row  # lines already cut into blocks
        self._wants_header = header
        self.header: bytes | None = None

    def _cut(self) -> int:
        newlines = np.flatnonzero(np.frombuffer(self._buffer, dtype=np.uint8) == 10)
        return int(newlines[self._rows - 1]) + 1

    def _check_lengths(self, data: bytes) -> int:
        """Refuses a line once it is longer than a row may be; returns the newlines in `data`."""
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        lengths = np.diff(ends, prepend=-1) - 1  # of the lines that end in `data`
        if len(ends):
            lengths[0] += self._partial  # the line began in earlier data
            self._partial = len(data) - int(ends[-1]) - 1
        else:
            self._partial += len(data)
        over = np.flatnonzero(lengths > self._max_row_bytes)
        if len(over) == 0 and self._partial <= self._max_row_bytes:
            return len(ends)
        before = self._lines + int(over[0] if len(over) else len(ends))  # lines before it
        if self._wants_header and self.header is None:
            before -= 1
        which = "the header line" if before < 0 else f"row {self._done + before + 1}"
        raise InvalidInput(
            f"{which} is longer than {self._max_row_bytes} bytes, the limit of one row "
            "(MODELSERVE_MAX_ROW_BYTES); end each row with a newline, or raise the limit"
        )

    def feed(self, data: bytes) -> list[bytes]:
        newlines = self._check_lengths(data)
        self._buffer += data
        self._lines += newlines
        if self._wants_header and self.header is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                return []
            self.header = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._lines -= 1
        blocks: list[bytes] = []
        while self._lines >= self._rows:
            blocks.append(self._take(self._cut(), self._rows))
        if self._lines and len(self._buffer) - self._partial >= self._block_bytes:
            blocks.append(self._take(len(self._buffer) - self._partial, self._lines))
        return blocks

    def _take(self, cut: int, lines: int) -> bytes:
        block = bytes(self._buffer[:cut])
        del self._buffer[:cut]
        self._lines -= lines
        self._done += lines
        return block

    def finish(self) -> bytes:
        """What is left: the last lines, without a newline at the end perhaps."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        if self._wants_header and self.header is None:
            self.header, rest = rest, b""
        return rest if rest.strip() else b""
