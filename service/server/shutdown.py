"""Graceful shutdown: on SIGTERM stop taking new work at once, then let the server drain."""

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

logger = logging.getLogger(__name__)


def install_drain_hook(on_drain: Callable[[], None], delay_s: float) -> Callable[[], None]:
    """Call `on_drain` as soon as SIGTERM arrives, then hand the signal on after `delay_s`.

    The handler we wrap is the server's own (uvicorn's): it closes the listener and waits for
    the requests it has accepted. Handing the signal on late keeps the listener open for the
    delay, so probes and late clients get a clean 503 instead of a refused connection.
    Returns a function that puts the wrapped handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals reach only the main thread (e.g. an in-process test app)
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return lambda: None  # no server handler to hand on to: leave the default behaviour
    loop = asyncio.get_running_loop()

    def on_term(signum: int, frame: FrameType | None) -> None:
        on_drain()
        # The loop is woken through its self-pipe; the hand-over then runs as a loop callback.
        loop.call_soon_threadsafe(loop.call_later, delay_s, previous, signum, frame)

    signal.signal(signal.SIGTERM, on_term)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_term:
            signal.signal(signal.SIGTERM, previous)

    return restore
