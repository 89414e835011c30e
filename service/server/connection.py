"""Each HTTP/1.1 connection: uvicorn's httptools protocol, with request heads bounded."""

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service import errors
from service.server.http import error_body, error_headers, status_of

logger = logging.getLogger(__name__)

# After a refusal, what the client still sends is read and dropped for up to this long before
# the connection closes: closing a socket with unread data makes the kernel reset the
# connection, and the reset can destroy the answer before the client has read it.
LINGER_S = 2.0


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int
    timeout_s: float


def http_protocol(limits: HeadLimits) -> type[asyncio.Protocol]:
    """What `uvicorn.run(http=...)` takes to serve every connection with these limits."""
    # uvicorn only calls `http` with keyword arguments, so a partial serves as the class, and it
    # pickles by reference into `--workers` processes.
    return cast(type[asyncio.Protocol], functools.partial(BoundedHeadProtocol, limits=limits))


class BoundedHeadProtocol(HttpToolsProtocol):
    """Answers 431 to a request head over `limits.max_bytes`, and 408 to one not received within
    `limits.timeout_s` of the connection opening or of the previous answer, then closes.

    httptools passes a header on only once its line is complete, and uvicorn keeps every header
    of a request, so unbounded they would hold whatever a client sends. The bytes read since the
    head began are counted after each read that leaves it incomplete (a line that never ends,
    or endless lines), and a head that completes is measured if those reads could hold more
    than the limit (a head that came in one read). A connection holds at most `max_bytes` and
    one read (uvloop reads up to 250 KB) of a head.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeadLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.in_head = False
        self.head_read = 0
        self.head_shares_read = False
        self.read_size = 0
        self.message_ended = False
        self.refused = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.start_timer(self.limits.timeout_s, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering: the client may still be sending the head it was refused for
        self.message_ended = False
        self.read_size = len(data)
        super().data_received(data)
        if self.in_head:
            # Bytes before a message began in this read belong to one that ended in it: leaving
            # such a read uncounted is safe (a read is bounded), and counting it would not be.
            self.head_read += 0 if self.message_ended else len(data)
            if self.head_read > self.limits.max_bytes:
                self.refuse(self.too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_read = 0
        # A head that begins where another message ended shares that read, and `head_read` does
        # not count such a read.
        self.head_shares_read = self.message_ended

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.cancel_timer()
        # The head is at most what was read since it began: only measure a head that may be over.
        limit = self.limits.max_bytes
        may_be_over = self.head_shares_read or self.head_read + self.read_size > limit
        if may_be_over and self.head_size() > limit:
            self.refuse(self.too_large())
        if not self.refused:
            super().on_headers_complete()

    def head_size(self) -> int:
        """The bytes of the URL and the header fields, each field with ": " and a line end."""
        fields = chain.from_iterable(self.headers)
        return len(self.url) + sum(map(len, fields)) + 4 * len(self.headers)

    def on_body(self, body: bytes) -> None:
        if not self.refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.message_ended = True
        if not self.refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:
            # uvicorn now waits for the next request; its head gets the same time.
            self.start_timer(self.limits.timeout_s, self.head_timed_out)

    def too_large(self) -> errors.HeadersTooLarge:
        return errors.HeadersTooLarge(
            f"request headers are over the limit of {self.limits.max_bytes} bytes; "
            "send fewer or shorter header fields"
        )

    def head_timed_out(self) -> None:
        self.refuse(
            errors.HeadersTimeout(
                f"request headers were not received within {self.limits.timeout_s:g} s"
            )
        )

    def refuse(self, exc: errors.ServiceError) -> None:
        """Answers `exc` unless an answer is under way, and closes once the client stops
        sending or after LINGER_S."""
        if self.refused:
            return
        self.refused = True
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "an unknown client"
        logger.warning("refused a request from %s: %s", client, exc.message)
        if self.cycle is not None and not self.cycle.response_complete:
            self.transport.close()  # an answer is under way: a second one cannot follow it
            return
        self.transport.write(self.answer(exc))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.start_timer(LINGER_S, self.transport.close)

    def answer(self, exc: errors.ServiceError) -> bytes:
        body = error_body(exc)
        headers = [
            *self.server_state.default_headers,
            *error_headers(exc),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        lines = [name + b": " + value + b"\r\n" for name, value in headers]
        return b"".join([STATUS_LINE[status_of(exc)], *lines, b"\r\n", body])

    def start_timer(self, delay: float, callback: Callable[[], object]) -> None:
        self.cancel_timer()
        self.timer = self.loop.call_later(delay, callback)

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
