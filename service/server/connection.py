"""Each HTTP/1.1 connection: uvicorn's httptools protocol, with request heads bounded, and its
own request cycle for small inference requests.
"""

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from itertools import chain
from typing import Any, cast

from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from service import errors
from service.server import boundary
from service.server.fastpath import DirectRoute, InferenceMiddleware
from service.server.http import Headers, Message, Scope, error_body, error_headers, status_of

logger = logging.getLogger(__name__)

# After a refusal, what the client still sends is read and dropped for up to this long before
# the connection closes: closing a socket with unread data makes the kernel reset the
# connection, and the reset can destroy the answer before the client has read it.
LINGER_S = 2.0


# Inference requests whose declared body is at most this long are served without the ASGI
# server's request cycle, which would add its flow control, an event per body read and a task
# switch per read. Such a body is held whole before it is handed on, so it is bounded: one read
# (of up to 256 KiB, with uvloop or asyncio). A 10,000-row binary request (160 KiB) comes whole
# with its head in about 6 reads out of 10 on loopback; the others come in two or three reads.
DIRECT_BODY_BYTES = 256 * 1024
# Headers that need the ASGI server's handling: a body sent in chunks or after 100 Continue, a
# proxy's forwarded client address.
_NOT_DIRECT = frozenset({b"transfer-encoding", b"expect", b"x-forwarded-for", b"x-forwarded-proto"})


# Requests parsed ahead of the one being answered past which reading stays paused.
PIPELINE_DEPTH = 32


class _LingeringClose:
    """A connection's transport as a request cycle sees it once it answered before the body
    arrived: closing it lingers (`BoundedHeadProtocol.linger`)."""

    def __init__(self, protocol: "BoundedHeadProtocol") -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.linger()


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
        # When the head of a request after an answer must be complete.
        self.head_deadline: float | None = None
        self.inference = _inference_app(self.app)
        # A request served by this connection's own cycle, while its body is being read.
        self.collecting: DirectCycle | None = None
        # The request being answered (uvicorn's `cycle` is the one parsed last).
        self.running: RequestResponseCycle | DirectCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = PipelineFlow(transport, self.pipeline)
        self.start_timer(self.limits.timeout_s, self.head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        # uvicorn tells only the request parsed last that the client left; the one being
        # answered may be an earlier one (pipelined), which would then write to a closed
        # transport and log a traceback.
        running = self.running
        if running is not None and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self.running = cycle
        # Shadows the method that run_asgi hands the application as its `send`.
        send = cast(Callable[[Message], Awaitable[None]], cycle.send)
        cycle.send = functools.partial(self.send_answer, cycle, send)  # type: ignore[method-assign]
        super()._start_asgi_task(cycle, app)

    async def send_answer(
        self,
        cycle: RequestResponseCycle,
        send: Callable[[Message], Awaitable[None]],
        message: Message,
    ) -> None:
        """A refusal that starts before its request's whole body arrived (too large,
        unauthorised, timed out) ends the connection: it says `connection: close`, and closing
        lingers, so neither a body of any length nor an idle client holds the connection. (A
        success may start early too: `:score` streams its answer while it reads the body.)"""
        if (
            message["type"] == "http.response.start"
            and message["status"] >= 400
            and cycle.more_body
        ):
            cycle.keep_alive = False  # uvicorn adds `connection: close` and closes after it
            cycle.transport = cast(asyncio.Transport, _LingeringClose(self))
        await send(message)

    def linger(self) -> None:
        """Drops what the client still sends and closes once it stops sending or after
        LINGER_S: closing on unread data would reset the connection, and the reset can destroy
        the answer before the client has read it."""
        self.refused = True
        if self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.start_timer(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering: the client may still be sending the head it was refused for
        self.message_ended = False
        self.read_size = len(data)
        super().data_received(data)
        cycle = self.collecting
        if cycle is not None and not cycle.started:
            # The body comes in later reads: its request starts now, so the body is read under
            # the request's deadline, and the request counts as in flight meanwhile.
            self.serve_direct(cycle)
        if self.in_head and self.timer is None and self.head_deadline is not None:
            self.timer = self.loop.call_at(self.head_deadline, self.head_timed_out)
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
        self.head_deadline = None
        # The head is at most what was read since it began: only measure a head that may be over.
        limit = self.limits.max_bytes
        may_be_over = self.head_shares_read or self.head_read + self.read_size > limit
        if may_be_over and self.head_size() > limit:
            self.cancel_timer()
            self.refuse(self.too_large())
        if self.refused:
            return
        self.cancel_timer()
        # A small inference request is served by the connection (see `DirectCycle`); every
        # other request goes to uvicorn's cycle.
        self.collecting = self.direct_cycle()
        if self.collecting is None:
            super().on_headers_complete()

    def direct_cycle(self) -> "DirectCycle | None":
        """This request's own cycle, if it is a small V2 infer or V1 predict call that needs
        nothing of uvicorn's but the parsing: its answer is the same either way."""
        parser = self.parser
        if (
            self.inference is None
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or parser.should_upgrade()
            or self.root_path
            or self.limit_concurrency is not None
            or self.flow.write_paused  # the client reads slowly: uvicorn's cycle waits for it
            or (self.cycle is not None and not self.cycle.response_complete)  # pipelined
        ):
            return None
        url = self.url
        if b"?" in url or b"%" in url or b"#" in url:
            return None
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name in _NOT_DIRECT:
                return None
        if length is None or not length.isdigit() or int(length) > DIRECT_BODY_BYTES:
            return None
        try:
            path = url.decode("ascii")
        except UnicodeDecodeError:
            return None
        route = self.inference.direct_route(path)
        if route is None:
            return None
        scope = cast(Scope, self.scope)
        scope["method"] = "POST"
        scope["path"] = path
        scope["raw_path"] = url
        scope["query_string"] = b""
        return DirectCycle(self, scope, route, parser.should_keep_alive())

    def serve_direct(self, cycle: "DirectCycle") -> None:
        cycle.started = True
        self.cycle = self.running = cycle  # type: ignore[assignment]  # it has what uvicorn asks
        task = self.loop.create_task(cycle.run())
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def head_size(self) -> int:
        """The bytes of the URL and the header fields, each field with ": " and a line end."""
        fields = chain.from_iterable(self.headers)
        return len(self.url) + sum(map(len, fields)) + 4 * len(self.headers)

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        if self.collecting is not None:
            self.collecting.chunks.append(body)  # bounded: httptools stops at Content-Length
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self.message_ended = True
        if self.refused:
            return
        cycle = self.collecting
        if cycle is not None:
            self.collecting = None
            self.cancel_timer()
            cycle.body_arrived()
            if not cycle.started:
                self.serve_direct(cycle)
        else:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.refused:
            return  # lingering until it closes: no request follows on this connection
        if self.timeout_keep_alive_task is not None:
            # uvicorn now waits for the next request; its head gets the same time. While the
            # connection is idle, uvicorn's keep-alive timer closes it first if it is the shorter:
            # the head's timer is then only started by a read that leaves a head incomplete.
            self.head_deadline = self.loop.time() + self.limits.timeout_s
            if self.limits.timeout_s < self.timeout_keep_alive:
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
        self.linger()

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


class PipelineFlow(FlowControl):
    """uvicorn's flow control, with reading kept paused while more than PIPELINE_DEPTH requests
    wait behind the one being answered.

    uvicorn pauses reading when a request arrives pipelined behind another, but resumes it after
    every answer (and whenever a request reads its body), and each read is parsed whole: a
    client that pipelines requests without reading the answers had every read of about 1,700
    small requests turned into waiting requests of several kilobytes each (a 100 MB flood grew
    a worker past 1.3 GB). The request being answered has its whole body by then (the parser
    reaches the next request only after it), so holding reads back cannot stall it.
    """

    def __init__(self, transport: asyncio.Transport, pipeline: Sized) -> None:
        super().__init__(transport)
        self.pipeline = pipeline

    def resume_reading(self) -> None:
        if len(self.pipeline) <= PIPELINE_DEPTH:
            super().resume_reading()


class _NoEvent:
    """What uvicorn sets on a cycle when its connection is lost, while the cycle waits for no
    read."""

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class _BodyWait:
    """A cycle's wait for the rest of its body: set when the body has come or the client left."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class DirectCycle:
    """One small inference request served by its connection: its body is handed on whole, and
    its answer is written at once (a body sent in pieces, as they are, in one vectored write).

    The handler is the one the ASGI path calls, through the same request boundary, with this
    cycle's `receive` and `send`; what is skipped is uvicorn's general machinery (an event per
    request, a body buffer that pauses reading, header checks on names the service writes
    itself, a write for the head and another for the body) and its proxy-header middleware
    (requests with forwarded headers take the ASGI path).
    """

    __slots__ = (
        "chunks",
        "complete",
        "disconnected",
        "headers",
        "keep_alive",
        "message_event",
        "pieces",
        "protocol",
        "received",
        "response_complete",
        "route",
        "scope",
        "started",
        "status",
    )

    def __init__(
        self, protocol: BoundedHeadProtocol, scope: Scope, route: DirectRoute, keep_alive: bool
    ) -> None:
        self.protocol = protocol
        self.scope = scope
        self.route = route
        self.keep_alive = keep_alive
        self.chunks: list[bytes] = []
        # The answer's body as sent so far, when it comes in several messages.
        self.pieces: list[bytes | memoryview] = []
        self.received = False
        # Started: the body did not come with the head, and is awaited by `receive`.
        self.started = False
        self.complete = False  # the whole body is in `chunks`
        self.message_event: _NoEvent | _BodyWait = _NO_EVENT
        self.disconnected = False
        self.response_complete = False
        self.status: int | None = None
        self.headers: Headers = []

    async def run(self) -> None:
        state, protocol, names, handler = self.route
        try:
            scope, receive, send = self.scope, self.receive, self.send
            await boundary.serve(state, scope, receive, send, protocol, names, handler)
        except BaseException as exc:  # uvicorn's answer to an application that fails
            logger.error("unexpected error serving %s", self.scope["path"], exc_info=exc)
            if not self.response_complete:
                self.response_complete = True
                transport = self.protocol.transport
                if not transport.is_closing():
                    failure = errors.ServiceError("internal error; see the server log")
                    transport.write(self.protocol.answer(failure))
                transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                logger.error("no answer to %s", self.scope["path"])
                self.protocol.transport.close()
        finally:
            # What came of an unread body: the cycle and its connection refer to each other, so
            # only the garbage collector would free them, and it may not run for a while.
            self.chunks = []

    def body_arrived(self) -> None:
        self.complete = True
        self.message_event.set()

    async def receive(self) -> Message:
        if not self.complete and not (self.disconnected or self.response_complete):
            wait = self.message_event = _BodyWait(self.protocol.loop)
            try:
                await wait.future
            finally:
                self.message_event = _NO_EVENT
        chunks = self.chunks
        if self.disconnected or self.response_complete or self.received:
            return {"type": "http.disconnect"}
        self.received = True
        # Not kept: the connection holds its last cycle while it waits for the next request.
        self.chunks = []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(self, message: Message) -> None:
        if self.disconnected or self.response_complete:
            return
        if message["type"] == "http.response.start" and self.status is None:
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body" and self.status is not None:
            self.pieces.append(message.get("body", b""))
            if not message.get("more_body", False):
                pieces, self.pieces = self.pieces, []
                self.write(pieces)
        else:
            raise RuntimeError(f"unexpected ASGI message {message['type']!r}")

    def write(self, body: list[bytes | memoryview]) -> None:
        """The whole answer in one write; the connection closes after it unless kept alive."""
        protocol = self.protocol
        assert self.status is not None
        if HEADER_VALUE_RE.search(b"".join([value for _, value in self.headers])):
            raise RuntimeError("Invalid HTTP header value.")
        lines = [STATUS_LINE[self.status], _default_head(protocol.server_state.default_headers)]
        # An answer before the whole body came (a refusal) ends the connection, lingering, as
        # the ASGI path's do (`BoundedHeadProtocol.send_answer`).
        early = protocol.collecting is self
        if early:
            protocol.collecting = None
        close = closing = early or not self.keep_alive
        for name, value in self.headers:
            if name == b"connection" and b"close" in value.lower():
                close, closing = True, False
            lines.append(b"%s: %s\r\n" % (name, value))
        if closing:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        transport = protocol.transport
        if not transport.is_closing():
            if len(body) == 1:
                transport.write(b"".join([*lines, body[0]]))
            else:  # a large answer's pieces are not copied into one buffer first
                transport.writelines([b"".join(lines), *body])
        self.response_complete = True
        if early:
            protocol.linger()
        elif close:
            transport.close()
        protocol.on_response_complete()


_default_heads: tuple[Headers | None, bytes] = (None, b"")


def _default_head(headers: Headers) -> bytes:
    """uvicorn's default headers (server, date) as they go on the wire: uvicorn replaces the
    list when the date changes, so it is formatted once a second, not once an answer."""
    global _default_heads
    if _default_heads[0] is not headers:
        _default_heads = headers, b"".join(b"%s: %s\r\n" % header for header in headers)
    return _default_heads[1]


def _inference_app(app: Any) -> InferenceMiddleware | None:
    """The inference middleware under uvicorn's wrappers (proxy headers, message logging)."""
    for _ in range(8):
        if isinstance(app, InferenceMiddleware):
            return app
        app = getattr(app, "app", None)
    return None
