"""Logging set up once at startup: plain text or JSON lines."""

import logging
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
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(record.msecs):03d}Z"


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


def configure_logging(level: str, fmt: str, access_log: bool = True) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Off, the access logger stops at its level check: no record is built per request.
    logging.getLogger("service.access").setLevel(logging.NOTSET if access_log else logging.WARNING)
    log_warnings()
