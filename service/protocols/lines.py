"""CSV and NDJSON bodies as blocks of whole lines, cut from a byte stream as it arrives."""

import numpy as np
from numpy.typing import NDArray

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
        # Where the buffer's newlines are, found once as bytes arrive (cutting never scans
        # again), kept per piece until a cut needs them together.
        self._ends: list[NDArray[np.intp]] = []
        self._lines = 0  # newlines in the buffer
        self._partial = 0  # bytes of the buffer after its last newline
        self._done = first_row  # lines already cut into blocks
        self._wants_header = header
        self.header: bytes | None = None

    def _check_lengths(self, data: bytes) -> NDArray[np.intp]:
        """Refuses a line once it is longer than a row may be; returns where `data`'s newlines
        are."""
        ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        lengths = np.diff(ends, prepend=-1) - 1  # of the lines that end in `data`
        if len(ends):
            lengths[0] += self._partial  # the line began in earlier data
            self._partial = len(data) - int(ends[-1]) - 1
        else:
            self._partial += len(data)
        over = np.flatnonzero(lengths > self._max_row_bytes)
        if len(over) == 0 and self._partial <= self._max_row_bytes:
            return ends
        before = self._lines + int(over[0] if len(over) else len(ends))  # lines before it
        if self._wants_header and self.header is None:
            before -= 1
        which = "the header line" if before < 0 else f"row {self._done + before + 1}"
        raise InvalidInput(
            f"{which} is longer than {self._max_row_bytes} bytes, the limit of one row "
            "(MODELSERVE_MAX_ROW_BYTES); end each row with a newline, or raise the limit"
        )

    def feed(self, data: bytes) -> list[bytes]:
        ends = self._check_lengths(data)
        if len(ends):
            self._ends.append(ends + len(self._buffer))
            self._lines += len(ends)
        self._buffer += data
        if self._wants_header and self.header is None:
            if not self._lines:
                return []
            end = int(self._newlines()[0]) + 1
            self.header = bytes(self._buffer[:end])
            self._drop(end, 1)
        whole = len(self._buffer) - self._partial  # bytes up to the last newline
        if self._lines < self._rows and (not self._lines or whole < self._block_bytes):
            return []
        newlines = self._newlines()
        blocks: list[bytes] = []
        cut = lines = 0
        with memoryview(self._buffer) as buffer:
            while self._lines - lines >= self._rows:
                lines += self._rows
                end = int(newlines[lines - 1]) + 1
                blocks.append(bytes(buffer[cut:end]))
                cut = end
            if self._lines > lines and whole - cut >= self._block_bytes:
                blocks.append(bytes(buffer[cut:whole]))
                cut, lines = whole, self._lines
        self._drop(cut, lines)
        self._done += lines
        return blocks

    def _newlines(self) -> NDArray[np.intp]:
        if len(self._ends) > 1:
            self._ends = [np.concatenate(self._ends)]
        return self._ends[0]

    def _drop(self, cut: int, lines: int) -> None:
        """The buffer without its first `cut` bytes, which hold `lines` lines."""
        del self._buffer[:cut]
        rest = self._newlines()[lines:] - cut if self._lines > lines else None
        self._ends = [] if rest is None else [rest]
        self._lines -= lines

    def finish(self) -> bytes:
        """What is left: the last lines, without a newline at the end perhaps."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        if self._wants_header and self.header is None:
            self.header, rest = rest, b""
        return rest if rest.strip() else b""


def quotes_span_lines(block: bytes, rows: int) -> bool:
    """Whether a quoted CSV value in this block of whole lines may hold a line end, so that its
    lines are not its rows: a line with an odd number of quotes, or fewer `rows` (as parsed)
    than lines with text. Blocks without a quote are answered at memchr speed."""
    if b'"' not in block:
        return False
    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    quotes = np.bincount(np.searchsorted(ends, np.flatnonzero(data == 34)), minlength=len(ends))
    if (quotes % 2).any():
        return True
    starts = np.concatenate(([0], ends + 1))
    stops = np.concatenate((ends, [len(data)]))
    lengths = stops - starts
    return_ended = (lengths > 0) & (data[np.maximum(stops - 1, 0)] == 13)  # \r\n line ends
    return rows < int(np.count_nonzero(lengths - return_ended > 0))
