"""Python warnings into the log: once per model version and source line, never raw on stderr."""

import logging
import threading
import warnings
from collections.abc import Callable
from typing import TextIO

from service.store.calls import calling

logger = logging.getLogger(__name__)

ShowWarning = Callable[[Warning | str, type[Warning], str, int, TextIO | None, str | None], None]


class WarningLog:
    """A `warnings.showwarning` that logs each warning once, naming the model that raised it.

    Once per model version and source line for warnings raised in a model call (whatever
    their text, which may carry numbers), once per source line and text for the others.
    Python's own once-per-line memory cannot do this: it would drop a second version's
    warning from the same line, and scikit-learn clears it on every call anyway.
    """

    def __init__(self, fallback: ShowWarning) -> None:
        self._fallback = fallback
        self._seen: set[tuple[object, ...]] = set()
        self._lock = threading.Lock()

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if file is not None:  # asked for in a particular file: not ours to reroute
            self._fallback(message, category, filename, lineno, file, line)
            return
        model = calling.model
        key = (model, category, filename, lineno, None if model else str(message))
        with self._lock:
            if key in self._seen:
                return
            self._seen.add(key)
        place = f"{filename}:{lineno}"
        if model is None:
            logger.warning(
                "%s: %s",
                category.__name__,
                message,
                extra={"category": category.__name__, "source": place},
            )
            return
        name, version = model
        logger.warning(
            "model %s version %s warned: %s: %s (logged once per version and source line)",
            name,
            version,
            category.__name__,
            message,
            extra={
                "model": name,
                "version": version,
                "category": category.__name__,
                "source": place,
            },
        )


def log_warnings() -> None:
    """Sends every Python warning of this process to the log from now on."""
    if isinstance(warnings.showwarning, WarningLog):
        return
    warnings.showwarning = WarningLog(warnings.showwarning)
    # Last, so that -W, PYTHONWARNINGS and the default ignores still apply: what they let
    # through reaches the log every time, and WarningLog decides what is new.
    warnings.filterwarnings("always", append=True)
