"""The one request boundary of every inference-like route: what each request goes through once.

Draining, credentials, the body's content coding, the request id (honoured or generated,
returned as `X-Request-ID`), the in-flight gauge, the deadline, the error tree mapped to status
codes, metrics and the access line are done here and nowhere else. A route plugs in a handler
that resolves its model, reads its body and either returns a whole answer or streams one
through `Exchange.start`. `run` and `record` are the part that knows no HTTP: the gRPC service
goes through them too.
"""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from service import errors
from service.server import access
from service.server.auth import Identity
from service.server.deadlines import Deadline, deadline
from service.server.http import (
    Body,
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

Answer = tuple[int, Body, Headers]


@dataclass(eq=False)
class Call:
    """One request inside the boundary, whatever carried it: what the handler learns, the
    boundary reports."""

    state: ServiceState
    protocol: str
    # The model and version as the request names them; they label the access line until (and
    # unless) the model resolves.
    names: tuple[str, str | None]
    request_id: str
    # For the access line: the HTTP method and path (a gRPC call's path is its method's name).
    method: str
    path: str
    # When the request arrived on the event loop's clock, for deadlines the client shortens.
    arrived: float
    started: float = field(default_factory=time.perf_counter)
    budget: Deadline | None = None
    model: ModelVersion | None = None
    rows: int = 0
    # The outcome the metrics record, as an HTTP status whatever the transport, so that one
    # set of series and dashboards covers every front door.
    outcome: int = 200
    error: str | None = None
    # Who is calling, once the credentials are checked (for rate limits and audit lines).
    identity: Identity | None = None
    # The client's network address, when a rate limit needs it (HTTP reads it from the scope).
    peer: str | None = None

    def address(self) -> str:
        """The client's network address, which names an anonymous client for rate limits."""
        return self.peer or "unknown"

    def shorten_deadline(self, seconds: float) -> None:
        """Counted from when the request arrived; a client may shorten the server's deadline,
        never extend it."""
        budget = self.budget
        if budget is not None and (deadline := budget.when()) is not None:
            budget.reschedule(min(deadline, self.arrived + seconds))


@dataclass(eq=False, kw_only=True)
class Exchange(Call):
    """A call over HTTP: the ASGI connection, and a streamed answer's progress."""

    scope: Scope
    receive: Receive
    send: Send
    # For a streamed answer: sent its status already; an error after the first bytes can only
    # be reported at the end of the body.
    streaming: bool = False

    async def start(self, status: int, headers: Headers) -> None:
        """Begin a streamed answer; from here on only the handler can report an error.

        The deadline covers the request up to its first byte of answer: a stream's length
        depends on its input, so past that point it has none.
        """
        if self.budget is not None:
            self.budget.reschedule(None)
        self.streaming = True
        self.outcome = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, *self._closing_headers()],
            }
        )

    def address(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else "unknown"

    def _closing_headers(self) -> Headers:
        headers = [(access.REQUEST_ID, self.request_id.encode())]
        if self.state.draining:
            headers.append((b"connection", b"close"))  # clients reconnect to another instance
        return headers


# Returns the whole answer, or None after streaming it through `Exchange.start`.
Handler = Callable[[Exchange], Awaitable[Answer | None]]
T = TypeVar("T")


def _check_content_encoding(scope: Scope) -> None:
    """Bodies are read as sent: a compressed one would be taken for garbled data."""
    coding = header(scope, b"content-encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise errors.UnsupportedMediaType(
            f"Content-Encoding {coding.strip()!r} is not supported; send the body uncompressed, "
            "without a Content-Encoding header"
        )


async def run(
    call: Call,
    authorization: str | None,
    api_key: str | None,
    work: Callable[[], Awaitable[T]],
) -> T | errors.ServiceError:
    """Admit `call` and do its `work` under the deadline and the in-flight gauge.

    The transport-independent core of the boundary: a failure comes back as an error of the
    tree (recorded on `call`, logged once when it is the server's fault) for the transport to
    answer with; `record` then counts and logs the call.
    """
    state = call.state
    inflight = state.metrics.inflight_add
    inflight(1)
    try:
        # The deadline covers reading the body too, so a client that trickles its body in
        # cannot hold a request open for longer than any other.
        async with deadline(state.settings.request_timeout_s, state.loop) as call.budget:
            if state.draining:
                raise errors.Overloaded(
                    "the server is shutting down; send the request to another instance"
                )
            credentials = state.credentials
            if call.protocol == "jobs":  # its models are checked as the job names them
                call.identity = await credentials.check_caller(authorization, api_key)
            else:
                call.identity = await credentials.check_inference(
                    authorization, api_key, call.names[0]
                )
            if state.limiter is not None:
                state.limiter.admit(call.identity, call.address())
            return await work()
    except TimeoutError:
        call.error = "DeadlineExceeded"
        return errors.DeadlineExceeded(
            f"the request's deadline passed after {time.perf_counter() - call.started:.3f} s"
        )
    except errors.ServiceError as exc:
        call.error = type(exc).__name__
        if status_of(exc) == 500:  # overload (503) and deadlines (504) are counted in metrics
            logger.error("request %s failed: %s", call.request_id, exc.message)
        return exc
    except Exception:  # the boundary: a bug answers 500 without a traceback, and is logged
        logger.exception("unexpected error serving %s (request %s)", call.path, call.request_id)
        call.error = "InternalError"
        return errors.ServiceError("internal error; see the server log")
    finally:
        inflight(-1)


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
    exchange = Exchange(
        state,
        protocol,
        names,
        access.request_id(scope),
        scope["method"],
        scope["path"],
        state.loop.time(),
        scope=scope,
        receive=receive,
        send=send,
    )

    async def work() -> Answer | None:
        _check_content_encoding(scope)
        return await handler(exchange)

    result = await run(exchange, header(scope, b"authorization"), header(scope, b"x-api-key"), work)
    seconds = time.perf_counter() - exchange.started
    answer = _error_answer(result, exchange.request_id) if isinstance(result, Exception) else result
    if answer is not None and exchange.streaming:
        # A streamed answer failed after its first bytes: too late for a status code.
        logger.error("request %s failed after its answer started", exchange.request_id)
        answer = None
        exchange.outcome = 500
    if answer is not None:
        status, payload, headers = answer
        await send_response(send, status, payload, [*headers, *exchange._closing_headers()])
        exchange.outcome = status
    record(exchange, seconds)


def record(call: Call, seconds: float) -> None:
    """Count `call` in the metrics by its outcome and write its access line."""
    status, model, protocol = call.outcome, call.model, call.protocol
    # Only a resolved model labels a series: names and versions come from the repository,
    # never from the request, so unknown models add no series.
    version: str | None
    if model is not None:
        name, version = model.name, str(model.version)
        call.state.metrics.request_done(name, version, protocol, status, seconds)
    else:
        name, version = call.names
    rows = call.rows if status == 200 else 0
    access.log_request(
        call.request_id,
        call.method,
        call.path,
        status,
        seconds,
        name,
        version,
        protocol,
        rows,
        call.error,
    )
