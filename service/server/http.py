"""HTTP plumbing shared by every route: the error table, error bodies, and bounded body reads."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from service import errors

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
# A response body: whole, or in pieces that go out one after another as they are (a binary
# answer's JSON header and each tensor's memory), so that a large one is never joined first.
Body = bytes | list[bytes | memoryview]

# Bodies larger than this are read into one buffer of their declared length.
_PREALLOCATE_BYTES = 1 << 20

# The one table from domain errors to HTTP status codes.
STATUS_CODES: dict[type[errors.ServiceError], int] = {
    errors.InvalidInput: 400,
    errors.ClientLeft: 499,
    errors.Unauthorized: 401,
    errors.InvalidToken: 401,
    errors.HeadersTimeout: 408,
    errors.BodyTimeout: 408,
    errors.Forbidden: 403,
    errors.ModelNotFound: 404,
    errors.RouteNotFound: 404,
    errors.MethodNotAllowed: 405,
    errors.Conflict: 409,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.RangeNotSatisfiable: 416,
    errors.RateLimited: 429,
    errors.HeadersTooLarge: 431,
    errors.PredictionFailed: 500,
    errors.ModelLoadError: 500,
    errors.ModelNotReady: 503,
    errors.Overloaded: 503,
    errors.DeadlineExceeded: 504,
    errors.StorageFull: 507,
}


# What the framework's own errors (a path no route serves, a method a route does not take, a
# body it cannot parse) are in the tree, so they answer with a `type` like every other error.
_FRAMEWORK_ERRORS: dict[int, type[errors.ServiceError]] = {
    400: errors.InvalidInput,
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.RouteNotFound,
    405: errors.MethodNotAllowed,
    413: errors.PayloadTooLarge,
    415: errors.UnsupportedMediaType,
}


def framework_error(status: int, message: str) -> errors.ServiceError:
    return _FRAMEWORK_ERRORS.get(status, errors.ServiceError)(message)


def status_of(exc: errors.ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 500


def error_body(exc: errors.ServiceError, request_id: str | None = None) -> bytes:
    body = {"error": exc.message, "type": type(exc).__name__}
    if request_id is not None:
        body["request_id"] = request_id
    return orjson.dumps(body)


def error_headers(exc: errors.ServiceError) -> Headers:
    headers = [(b"content-type", b"application/json")]
    if isinstance(exc, errors.Overloaded):
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    if isinstance(exc, errors.Unauthorized):
        headers.append((b"www-authenticate", _challenge(exc.challenge, None)))
    if isinstance(exc, errors.Forbidden) and exc.scope is not None:
        headers.append((b"www-authenticate", _challenge("insufficient_scope", exc.scope)))
    if isinstance(exc, errors.MethodNotAllowed):
        headers.append((b"allow", b"POST"))
    if isinstance(exc, errors.RangeNotSatisfiable) and exc.size is not None:
        headers.append((b"content-range", f"bytes */{exc.size}".encode()))
    return headers


def _challenge(error: str | None, scope: str | None) -> bytes:
    """An RFC 6750 `WWW-Authenticate` value: `Bearer` alone when no credentials were sent."""
    attributes = [f'error="{error}"'] if error else []
    if scope is not None:
        attributes.append(f'scope="{scope}"')
    return ("Bearer " + ", ".join(attributes)).strip().encode("latin-1", "replace")


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def read_body(
    scope: Scope, receive: Receive, limit: int, reserve: Callable[[int], None] | None = None
) -> bytes | bytearray:
    """The whole body, refusing it as soon as it is known to exceed `limit` bytes.

    `reserve` is told each size of body before it is read: the declared length at once, else
    each chunk as it arrives.
    """
    declared = header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise errors.InvalidInput("Content-Length must be a non-negative integer")
        if int(declared) > limit:
            raise errors.PayloadTooLarge(
                f"request body of {declared} bytes is over the limit of {limit}"
            )
        if reserve is not None:
            reserve(int(declared))
        if int(declared) > _PREALLOCATE_BYTES:
            return await _read_declared(receive, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in body_chunks(receive):
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        if reserve is not None and declared is None:
            reserve(len(chunk))
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_declared(receive: Receive, length: int) -> bytearray:
    """A body of known length, copied into place as it arrives: never held twice, as a list of
    chunks and their join would be."""
    body = bytearray(length)
    size = 0
    async for chunk in body_chunks(receive):
        if size + len(chunk) > length:
            raise errors.InvalidInput(f"the body is longer than its Content-Length of {length}")
        body[size : size + len(chunk)] = chunk
        size += len(chunk)
    del body[size:]
    return body


def idle_bounded(receive: Receive, idle_s: float) -> Receive:
    """`receive` for an upload, which no deadline bounds (its length is the client's): 408
    once no part of the body arrives for `idle_s` seconds, so a trickle cannot hold it forever."""

    async def bounded() -> Message:
        try:
            return await asyncio.wait_for(receive(), idle_s)
        except TimeoutError:
            raise errors.BodyTimeout(
                f"no part of the request body arrived for {idle_s:g} s "
                "(MODELSERVE_BODY_IDLE_TIMEOUT_S)"
            ) from None

    return bounded


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The body's non-empty chunks as they arrive; a client that leaves is invalid input."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise errors.ClientLeft("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def send_response(send: Send, status: int, body: Body, headers: Headers) -> None:
    """A whole answer; a body in pieces goes as one ASGI body message per piece."""
    pieces: list[bytes | memoryview]
    if isinstance(body, bytes):
        pieces, length = [body], len(body)
    else:
        pieces = body
        length = sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(length).encode())],
        }
    )
    for piece in pieces[:-1]:
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": pieces[-1] if pieces else b""})


_ERROR_KEY = "modelserve.access.error"
# The method the client sent, where the server answers a request as another (HEAD as GET).
_ASKED_METHOD_KEY = "modelserve.access.method"


def answered_as(scope: Scope, method: str) -> Scope:
    """The scope of a request served as `method`; its access line keeps the client's."""
    return {**scope, "method": method, _ASKED_METHOD_KEY: scope["method"]}


def asked_method(scope: Scope) -> str:
    """The method the client sent."""
    method: str = scope.get(_ASKED_METHOD_KEY, scope["method"])
    return method


def note_error(scope: Scope, kind: str) -> None:
    """The error type a control-plane answer carries, for its access line: the handlers that
    answer errors run inside the framework, the line is written outside it."""
    state = scope.get("state")
    if isinstance(state, dict):  # one per request: a shallow copy of the lifespan's state
        state[_ERROR_KEY] = kind


def noted_error(scope: Scope) -> str | None:
    state = scope.get("state")
    kind = state.get(_ERROR_KEY) if isinstance(state, dict) else None
    return kind if isinstance(kind, str) else None


class BodyGuard:
    """Bounds the request bodies of the routes the framework serves: 413 for one over `limit`
    bytes as soon as that is known, 408 for one whose next part does not arrive within
    `idle_s` seconds (a client that trickles a body, or stops sending it, would otherwise
    hold its request and connection forever).

    A declared Content-Length is checked before anything is read, and a chunked body is
    counted as it arrives, so no body larger than the limit is ever held in memory. (The
    inference fast path reads its body with `read_body` under the request deadline, and
    uploads with `idle_bounded`.)
    """

    def __init__(self, app: Any, limit: int, idle_s: float) -> None:
        self.app = app
        self.limit = limit
        self.idle_s = idle_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _refuse(
                scope,
                send,
                errors.PayloadTooLarge(
                    f"request body of {declared} bytes is over the limit of {self.limit}"
                ),
            )
            return
        body = _GuardedBody(self, scope, receive, send)
        try:
            await self.app(scope, body.receive, body.send)
        except (errors.PayloadTooLarge, errors.BodyTimeout):
            if body.started or body.refusal is None:  # too late for a status code, or not ours
                raise
        if body.refusal is not None and not body.started:
            await _refuse(scope, send, body.refusal)


class _GuardedBody:
    """One request's `receive` and `send` under a BodyGuard."""

    def __init__(self, guard: BodyGuard, scope: Scope, receive: Receive, send: Send) -> None:
        self.guard, self.scope, self._receive, self._send = guard, scope, receive, send
        self._bounded = idle_bounded(receive, guard.idle_s)
        self.received = 0
        self.refusal: errors.ServiceError | None = None
        self.complete = self.started = self.replaced = False

    async def receive(self) -> Message:
        if self.complete:  # past the body: waits for the client to leave, however long
            return await self._receive()
        try:
            message = await self._bounded()
        except errors.BodyTimeout as exc:
            self.refusal = exc
            raise
        self.complete = not message.get("more_body", False)
        self.received += len(message.get("body", b""))
        if self.received > self.guard.limit:
            self.refusal = errors.PayloadTooLarge(
                f"request body is over the limit of {self.guard.limit} bytes"
            )
            raise self.refusal
        return message

    async def send(self, message: Message) -> None:
        # The framework answers a failed body read with its own 400; say why instead.
        if self.refusal is not None and not self.started:
            self.started = self.replaced = True
            await _refuse(self.scope, self._send, self.refusal)
        if self.replaced:
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)


async def _refuse(scope: Scope, send: Send, exc: errors.ServiceError) -> None:
    note_error(scope, type(exc).__name__)
    headers = [*error_headers(exc), (b"connection", b"close")]
    await send_response(send, status_of(exc), error_body(exc), headers)
