"""Logging set up once at startup: plain text or JSON lines."""

import asyncio
import atexit
import logging
import os
import re
import time
from typing import Any

import orjson

from service.observability.warning_log import log_warnings

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
# uvicorn adds `color_message`, a copy of the message for terminals.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class Clock:
    """ISO 8601 UTC times with milliseconds; one strftime per second, not one per line."""

    def __init__(self) -> None:
        self._second = -1
        self._stamp = ""

    def stamp(self, record: logging.LogRecord) -> str:
        return self.stamp_at(record.created)

    def stamp_at(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, then the extras."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = Clock()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._clock.stamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


_BARE = re.compile(r"[!#-<>-\[\]-~]+")  # visible ASCII but for '"', '=' and '\\'


def _text_value(value: Any) -> str:
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    # Quoted and escaped, so a value (a URL path, say) can never break or forge a line.
    return orjson.dumps(text).decode()


class TextFormatter(logging.Formatter):
    """Time, level, logger and message, then the extras as key=value pairs (None left out)."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = Clock()

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            self._clock.stamp(record),
            record.levelname,
            f"{record.name}:",
            record.getMessage(),
        ]
        parts.extend(
            f"{k}={_text_value(v)}"
            for k, v in vars(record).items()
            if k not in _STANDARD and v is not None
        )
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


ACCESS_LOGGER = "service.access"  # named as before the package was split: pipelines filter on it
ACCESS_FIELDS = (
    "request_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "model",
    "version",
    "protocol",
    "rows",
    "error",
)


class AccessLines:
    """Access lines as the handler's formatter would write them, but without a LogRecord each,
    and written once per turn of the event loop rather than once per request.

    At thousands of requests per second, building a record, passing it through the logging
    machinery and writing it alone cost a request as much as the model call. Only in force
    while logging is as `configure_logging` left it (see `active`); otherwise access lines
    take the standard path, so a handler or filter added later sees every line.
    """

    def __init__(self, handler: logging.StreamHandler[Any], fmt: str) -> None:
        self._handler = handler
        self._json = fmt == "json"
        self._clock = Clock()
        self._pending: list[str] = []
        self._bare: dict[str, str] = {}  # text values seen before (paths, names), as written
        # A text line's parts around its request id and duration, by the other fields: the
        # same few combinations make up almost every line.
        self._parts: dict[tuple[Any, ...], tuple[str, str, str]] = {}
        self._root = logging.getLogger()
        self._logger = logging.getLogger(ACCESS_LOGGER)

    def active(self) -> bool:
        handlers, logger = self._root.handlers, self._logger
        return (
            len(handlers) == 1
            and handlers[0] is self._handler
            and not logger.handlers
            and not logger.filters
            and not self._handler.filters
            and logger.propagate
        )

    def _text(self, value: str) -> str:
        text = self._bare.get(value)
        if text is None:
            text = _text_value(value)
            if len(self._bare) < 4096:  # paths and names repeat; unknown paths cannot grow it
                self._bare[value] = text
        return text

    def write(self, level: int, values: tuple[Any, ...]) -> None:
        """One line of ACCESS_FIELDS `values`, at `level`."""
        now = time.time()
        if self._json:
            entry: dict[str, Any] = {
                "time": self._clock.stamp_at(now),
                "level": logging.getLevelName(level).lower(),
                "logger": ACCESS_LOGGER,
                "message": "request",
                "pid": os.getpid(),
            }
            entry.update(zip(ACCESS_FIELDS, values, strict=True))
            line = orjson.dumps(entry, default=str).decode()
        else:
            request, duration = values[0], values[4]
            # The request id is new on every line: checked, not remembered (ours are hex).
            request = request if request.isalnum() else _text_value(request)
            key = (level, *values[1:4], *values[5:])
            parts = self._parts.get(key) or self._line_parts(key)
            line = f"{self._clock.stamp_at(now)}{parts[0]}{request}{parts[1]}{duration}{parts[2]}"
        self._pending.append(line)
        if len(self._pending) > 1:
            return  # a flush is scheduled already
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: written at once
            self.flush()
            return
        loop.call_soon(self.flush)

    def _line_parts(self, key: tuple[Any, ...]) -> tuple[str, str, str]:
        """A text line but for its time, request id and duration: the text before the id,
        between the id and the duration, and after the duration."""
        level, method, path, status, *rest = key
        tail = ""
        for name, value in zip(ACCESS_FIELDS[5:], rest, strict=True):
            if value is not None:
                # Numbers never need quotes; names and versions repeat.
                tail += f" {name}={self._text(value) if isinstance(value, str) else value}"
        parts = (
            f" {logging.getLevelName(level)} service.access: request request_id=",
            f" method={self._text(method)} path={self._text(path)} status={status} duration_ms=",
            tail,
        )
        if len(self._parts) < 4096:  # row counts vary, but most requests repeat one
            self._parts[key] = parts
        return parts

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if not lines:
            return
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write("\n".join(lines) + "\n")
            handler.stream.flush()
        except Exception:  # as in logging: a failing log stream never fails a request
            pass
        finally:
            handler.release()


access_lines: AccessLines | None = None


@atexit.register
def _flush_access_lines() -> None:
    if access_lines is not None:
        access_lines.flush()


def configure_logging(level: str, fmt: str, access_log: bool = True) -> None:
    global access_lines
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    if access_lines is not None:
        access_lines.flush()
    access_lines = AccessLines(handler, fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Off, the access logger stops at its level check: no record is built per request.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.NOTSET if access_log else logging.WARNING)
    log_warnings()
