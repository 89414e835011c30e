"""The one request boundary of every inference-like route: what each request goes through once.

Draining, credentials, the body's content coding, the request id (honoured or generated,
returned as `X-Request-ID`), the in-flight gauge, the deadline, the error tree mapped to status
codes, metrics and the access line are done here and nowhere else. A route plugs in a handler
that resolves its model, reads its body and either returns a whole answer or streams one
through `Exchange.start`.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service import errors
from service.server import access
from service.server.auth import Identity
from service.server.http import (
    Headers,
    Receive,
    Scope,
    Send,
    error_body,
    error_headers,
    header,
    send_response,
    status_of,
)
from service.server.state import ServiceState
from service.store.registry import ModelVersion

logger = logging.getLogger(__name__)

Answer = tuple[int, bytes, Headers]


@dataclass(eq=False)
class Exchange:
    """One request inside the boundary: what the handler learns, the boundary reports."""

    state: ServiceState
    scope: Scope
    receive: Receive
    send: Send
    protocol: str
    # The model and version as the path names them; they label the access line until (and
    # unless) the model resolves.
    names: tuple[str, str | None]
    request_id: str
    # When the request arrived on the event loop's clock, for deadlines the client shortens.
    arrived: float
    budget: asyncio.Timeout | None = None
    model: ModelVersion | None = None
    identity: Identity | None = None
    rows: int = 0
    # For a streamed answer: its status once sent, and the outcome the metrics record (an
    # error after the first bytes can only be reported at the end of the body).
    started: bool = False
    outcome: int = 200
    error: str | None = None
    _id_header: Headers = field(default_factory=list)

    async def start(self, status: int, headers: Headers) -> None:
        """Begin a streamed answer; from here on only the handler can report an error.

        The deadline covers the request up to its first byte of answer: a stream's length
        depends on its input, so past that point it has none.
        """
        if self.budget is not None:
            self.budget.reschedule(None)
        self.started = True
        self.outcome = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, *self._closing_headers()],
            }
        )

    def _closing_headers(self) -> Headers:
        headers = [(access.REQUEST_ID, self.request_id.encode())]
        if self.state.draining:
            headers.append((b"connection", b"close"))  # clients reconnect to another instance
        return headers


# Returns the whole answer, or None after streaming it through `Exchange.start`.
Handler = Callable[[Exchange], Awaitable[Answer | None]]


async def _admit(exchange: Exchange) -> None:
    state, scope = exchange.state, exchange.scope
    if state.draining:
        raise errors.Overloaded("the server is shutting down; send the request to another instance")
    exchange.identity = await state.credentials.check_inference(
        header(scope, b"authorization"), header(scope, b"x-api-key"), exchange.names[0]
    )
    _check_content_encoding(scope)


def _check_content_encoding(scope: Scope) -> None:
    """Bodies are read as sent: a compressed one would be taken for garbled data."""
    coding = header(scope, b"content-encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise errors.UnsupportedMediaType(
            f"Content-Encoding {coding.strip()!r} is not supported; send the body uncompressed, "
            "without a Content-Encoding header"
        )


def _error_answer(exc: errors.ServiceError, request_id: str) -> Answer:
    status = status_of(exc)
    # Server-side failures name the request, so the client can quote it and an operator can
    # find the traceback in the log; the client's own mistakes need no lookup.
    return status, error_body(exc, request_id if status >= 500 else None), error_headers(exc)


async def serve(
    state: ServiceState,
    scope: Scope,
    receive: Receive,
    send: Send,
    protocol: str,
    names: tuple[str, str | None],
    handler: Handler,
) -> None:
    """Run `handler` inside the boundary, for the model and version the path `names`."""
    started = time.perf_counter()
    request_id = access.request_id(scope)
    metrics = state.metrics
    answer: Answer | None = None
    exchange = Exchange(
        state, scope, receive, send, protocol, names, request_id, asyncio.get_running_loop().time()
    )
    metrics.inflight.inc()
    try:
        # The deadline covers reading the body too, so a client that trickles its body in
        # cannot hold a request open for longer than any other.
        async with asyncio.timeout(state.settings.request_timeout_s) as exchange.budget:
            await _admit(exchange)
            answer = await handler(exchange)
    except TimeoutError:
        late = errors.DeadlineExceeded(
            f"the request's deadline passed after {time.perf_counter() - started:.3f} s"
        )
        answer = _error_answer(late, request_id)
        exchange.error = "DeadlineExceeded"
    except errors.ServiceError as exc:
        answer = _error_answer(exc, request_id)
        exchange.error = type(exc).__name__
        if answer[0] == 500:  # overload (503) and deadlines (504) are counted in metrics instead
            logger.error("request %s failed: %s", request_id, exc.message)
    except Exception:  # the HTTP boundary: a bug answers 500 without a traceback, and is logged
        logger.exception("unexpected error serving %s (request %s)", scope["path"], request_id)
        answer = _error_answer(
            errors.ServiceError("internal error; see the server log"), request_id
        )
        exchange.error = "InternalError"
    finally:
        metrics.inflight.dec()
        seconds = time.perf_counter() - started
    if answer is not None and exchange.started:
        # A streamed answer failed after its first bytes: too late for a status code.
        logger.error("request %s failed after its answer started", request_id)
        answer = None
        exchange.outcome = 500
    if answer is not None:
        status, payload, headers = answer
        await send_response(send, status, payload, [*headers, *exchange._closing_headers()])
        exchange.outcome = status
    _record(exchange, seconds)


def _record(exchange: Exchange, seconds: float) -> None:
    status, model, protocol = exchange.outcome, exchange.model, exchange.protocol
    # Only a resolved model labels a series: names and versions come from the repository,
    # never from the request, so unknown models add no series.
    version: str | None
    if model is not None:
        name, version = model.name, str(model.version)
        metrics = exchange.state.metrics
        metrics.requests.labels(name, version, protocol, str(status)).inc()
        if status == 200:  # errors are counted by code; their time would blur the latency
            metrics.request_duration.labels(name, version, protocol).observe(seconds)
    else:
        name, version = exchange.names
    rows = exchange.rows if status == 200 else 0
    access.log_request(
        exchange.request_id,
        exchange.scope,
        status,
        seconds,
        name,
        version,
        protocol,
        rows,
        exchange.error,
    )
