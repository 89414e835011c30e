"""The hot inference path as plain ASGI, in front of FastAPI.

V2 `infer` and V1 `predict` requests are matched by one regular expression and served here,
skipping the per-request routing, dependency and validation machinery of the framework: on
single-row requests that machinery costs more than the model. Every other request passes
through to FastAPI.
"""

import asyncio
import logging
import re
import time
from typing import Any

from fastapi import FastAPI
from numpy.typing import NDArray

from service import errors
from service.prediction.router import Router
from service.protocols import v1, v2
from service.server import access
from service.server.http import (
    Receive,
    Scope,
    Send,
    error_body,
    error_headers,
    header,
    read_body,
    send_response,
    status_of,
)
from service.server.score import serve_score
from service.server.state import ServiceState
from service.store.registry import ModelVersion

logger = logging.getLogger(__name__)

_ROUTE = re.compile(
    r"/v2/models/(?P<v2name>[^/]*)(?:/versions/(?P<v2version>[^/]*))?/infer"
    r"|/v1/models/(?P<v1name>[^/]*)(?:/versions/(?P<v1version>[^/]*))?:predict"
    r"|/v1/models/(?P<scorename>[^/]*)(?:/versions/(?P<scoreversion>[^/]*))?:score"
)
_JSON = [(b"content-type", b"application/json")]
_ACCEPTED_TYPES = ("application/json", "application/octet-stream")


def _check_content_type(scope: Scope) -> None:
    content_type = header(scope, b"content-type")
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in _ACCEPTED_TYPES:
        raise errors.UnsupportedMediaType(
            f"content type {media_type!r} is not accepted here; send application/json "
            "(or application/octet-stream with the binary tensor extension); curl -d needs "
            "-H 'Content-Type: application/json'"
        )


class InferenceMiddleware:
    """Wraps the FastAPI application, whose lifespan puts the ServiceState on app.state.

    Outside the framework's own middleware (error pages, telemetry, body limits), which
    would add their work and a send wrapper each to every inference request; this path
    has its own error boundary and body limit.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        match = _ROUTE.fullmatch(scope["path"])
        state: ServiceState | None = getattr(self.app.state, "service", None)
        if match is None or state is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] != "POST":
            wrong = errors.MethodNotAllowed(f"{scope['method']} is not allowed here; send POST")
            await send_response(send, 405, error_body(wrong), error_headers(wrong))
            return
        if match["scorename"] is not None:
            # Streamed: the body may be far larger than any whole-body limit.
            await serve_score(
                state, match["scorename"], match["scoreversion"], scope, receive, send
            )
            return
        await _serve(state, match, scope, receive, send)


async def _serve(
    state: ServiceState, match: re.Match[str], scope: Scope, receive: Receive, send: Send
) -> None:
    started = time.perf_counter()
    protocol = "v2" if match["v2name"] is not None else "v1"
    request_id = access.request_id(scope)
    request = _Request(state, match, scope, receive)
    error: str | None = None
    metrics = state.metrics
    metrics.inflight.inc()
    try:
        # The deadline covers reading the body too, so a client that trickles its body in
        # cannot hold a request open for longer than any other.
        async with asyncio.timeout(state.settings.request_timeout_s) as budget:
            status, payload, headers = await request.answer(protocol, budget)
    except TimeoutError:
        late = errors.DeadlineExceeded(
            f"the request's deadline passed after {time.perf_counter() - started:.3f} s"
        )
        status, payload, headers = 504, error_body(late, request_id), error_headers(late)
        error = "DeadlineExceeded"
    except errors.ServiceError as exc:
        status = status_of(exc)
        # Server-side failures name the request, so the client can quote it and an operator
        # can find the traceback in the log; the client's own mistakes need no lookup.
        payload = error_body(exc, request_id if status >= 500 else None)
        headers = error_headers(exc)
        error = type(exc).__name__
        if status == 500:  # overload (503) and deadlines (504) are counted in metrics instead
            logger.error("request %s failed: %s", request_id, exc.message)
    except Exception:  # the HTTP boundary: a bug answers 500 without a traceback, and is logged
        logger.exception("unexpected error serving %s (request %s)", scope["path"], request_id)
        fault = errors.ServiceError("internal error; see the server log")
        status, payload, headers = 500, error_body(fault, request_id), error_headers(fault)
        error = "InternalError"
    finally:
        metrics.inflight.dec()
    seconds = time.perf_counter() - started
    model = request.model
    # Only a resolved model labels a series: names and versions come from the repository,
    # never from the request, so unknown models add no series.
    if model is not None:
        name, version = model.name, str(model.version)
        metrics.requests.labels(name, version, protocol, str(status)).inc()
        if status == 200:  # errors are counted by code; their time would blur the latency
            metrics.request_duration.labels(name, version, protocol).observe(seconds)
    else:
        name, version = match["v2name"] or match["v1name"], match["v2version"] or match["v1version"]
    headers = [*headers, (access.REQUEST_ID, request_id.encode())]
    if state.draining:
        headers.append((b"connection", b"close"))  # clients reconnect to another instance
    await send_response(send, status, payload, headers)
    rows = request.rows if status == 200 else 0
    access.log_request(request_id, scope, status, seconds, name, version, protocol, rows, error)


def _rows(tensors: dict[str, NDArray[Any]]) -> int:
    first = next(iter(tensors.values()), None)
    return 0 if first is None else (first.shape[0] if first.ndim else 1)


class _Request:
    """One inference request from its headers to its encoded answer; raises the error tree."""

    def __init__(self, state: ServiceState, match: re.Match[str], scope: Scope, receive: Receive):
        self.state = state
        self.match = match
        self.scope = scope
        self.receive = receive
        self.model: ModelVersion | None = None
        self.rows = 0
        self.started = asyncio.get_running_loop().time()

    async def answer(
        self, protocol: str, budget: asyncio.Timeout
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        state, scope = self.state, self.scope
        if state.draining:
            raise errors.Overloaded(
                "the server is shutting down; send the request to another instance"
            )
        state.credentials.check_api_key(
            header(scope, b"authorization"), header(scope, b"x-api-key")
        )
        _check_content_type(scope)
        body = await read_body(scope, self.receive, state.settings.max_request_bytes)
        router = state.router
        if protocol == "v2":
            self.model = router.resolve(self.match["v2name"], self.match["v2version"])
            call = v2.decode_infer_request(body, header(scope, v2.HEADER_LENGTH.encode()))
            self.rows = _rows(call.tensors)
            return await _infer_v2(router, self.model, call, budget, self.started)
        self.model = router.resolve(self.match["v1name"], self.match["v1version"])
        tensors = v1.decode_predict_request(self.model, body)
        self.rows = _rows(tensors)
        prediction = await router.predict(self.model, tensors)
        return (
            200,
            v1.encode_predict_response(self.model, prediction.outputs, prediction.label_index),
            _JSON,
        )


async def _infer_v2(
    router: Router,
    model: ModelVersion,
    call: v2.InferCall,
    budget: asyncio.Timeout,
    started: float,
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    timeout_s = v2.requested_timeout_s(call)
    deadline = budget.when()
    if timeout_s is not None and deadline is not None:
        # Counted from when the request arrived; a client may shorten the server's deadline,
        # never extend it.
        budget.reschedule(min(deadline, started + timeout_s))
    wanted = v2.select_outputs(model, call)
    prediction = await router.predict(model, call.tensors)
    payload, json_length = v2.encode_infer_response(
        model, call, prediction.outputs, wanted, prediction.label_index
    )
    if json_length is None:
        return 200, payload, _JSON
    return (
        200,
        payload,
        [
            (b"content-type", b"application/octet-stream"),
            (v2.HEADER_LENGTH.encode(), str(json_length).encode()),
        ],
    )
