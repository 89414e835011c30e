"""A one-line progress bar (rows, rows/s, ETA) for terminals; silent when output is piped."""

import time
from typing import TextIO

_WIDTH = 24
_EVERY_S = 0.1


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressBar:
    """Progress through `total` bytes of input; the ETA assumes the rate seen so far."""

    def __init__(self, total: int, stream: TextIO, enabled: bool | None = None) -> None:
        self._total = max(total, 1)
        self._stream = stream
        self._enabled = stream.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._shown = 0.0  # when the line was last drawn
        self.rows = 0
        self.done = 0

    def advance(self, rows: int, done: int) -> None:
        self.rows += rows
        self.done += done
        now = time.monotonic()
        if self._enabled and now - self._shown >= _EVERY_S:
            self._shown = now
            self._draw(now)

    def restart(self) -> None:
        """Back to no rows: the input is scored again from its start."""
        self.rows = self.done = 0

    @property
    def drawn(self) -> bool:
        """Whether the line is on the terminal (a message after it starts on a line of its own)."""
        return self._shown > 0

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        fraction = min(self.done / self._total, 1.0)
        filled = int(fraction * _WIDTH)
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else 0.0
        line = (
            f"\r[{'#' * filled}{'.' * (_WIDTH - filled)}] {fraction:4.0%}  {self.rows:,} rows  "
            f"{self.rows / elapsed:,.0f} rows/s  ETA {_clock(eta)} "
        )
        self._stream.write(line)
        self._stream.flush()

    def close(self) -> None:
        if self._enabled:
            self.done = self._total
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
