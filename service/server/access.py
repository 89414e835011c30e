"""Access logs and request ids: one log line per request, for the fast path and the control plane.

Every response carries `X-Request-ID`: the client's own when it is short and printable, else a
new one. A line names the model, version, protocol, status, duration and rows, never a value
from the request body.
"""

import itertools
import logging
import os
import time
from typing import Any

from service import errors
from service.observability import logs
from service.server.http import (
    Message,
    Receive,
    Scope,
    Send,
    asked_method,
    error_body,
    error_headers,
    noted_error,
    send_response,
)

logger = logging.getLogger(logs.ACCESS_LOGGER)

REQUEST_ID = b"x-request-id"
# Probes and scrapes come every few seconds; at debug level they do not bury the requests.
_QUIET_PATHS = frozenset({"/", "/metrics", "/v2/health/live", "/v2/health/ready"})
# So are the status page's own refreshes; a failed one, or anything else it sends, is not.
STATUS_PAGE = b"x-modelserve-status-page"


def _from_status_page(scope: Scope) -> bool:
    """A read the open status page repeats every few seconds (it marks them): at debug level."""
    return any(name == STATUS_PAGE for name, _ in scope["headers"])


def _new_ids() -> None:
    global _prefix, _counter
    # Random per process, counted per request: unique across workers and restarts, at the
    # cost of a counter step rather than a uuid4 (16 bytes from the kernel each).
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(int.from_bytes(os.urandom(4)))


_prefix: str
_counter: "itertools.count[int]"
_new_ids()
os.register_at_fork(after_in_child=_new_ids)


def new_request_id() -> str:
    """32 hex digits, as a uuid4's hex."""
    return f"{_prefix}{next(_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def _printable(value: bytes) -> bool:
    # Visible ASCII only: an id is copied into log lines and headers, so it cannot forge either.
    return 0 < len(value) <= 128 and all(33 <= byte <= 126 for byte in value)


def request_id(scope: Scope) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    for key, value in scope["headers"]:
        if key == REQUEST_ID:
            if _printable(value):
                return bytes(value).decode("ascii")
            break
    return new_request_id()


def request_id_from(value: str | None) -> str:
    """The same for an id given as text (gRPC metadata)."""
    if value is not None and value.isascii() and _printable(value.encode()):
        return value
    return new_request_id()


def log_request(
    request: str,
    method: str,
    path: str,
    status: int,
    seconds: float,
    model: str | None = None,
    version: str | None = None,
    protocol: str | None = None,
    rows: int | None = None,
    error: str | None = None,
    level: int = logging.INFO,
) -> None:
    """The one access line of a request (the fields are named in the README)."""
    if not logger.isEnabledFor(level):
        return
    values = (
        request,
        method,
        path,
        status,
        round(seconds * 1000, 3),
        model,
        version,
        protocol,
        rows,
        error,
    )
    lines = logs.access_lines
    if lines is not None and lines.active():
        lines.write(level, values)
        return
    fields = dict(zip(logs.ACCESS_FIELDS, values, strict=True))
    # makeRecord and handle, not logger.log: the caller's file and line would be this
    # function's anyway, and looking them up walks the stack on every request.
    logger.handle(
        logger.makeRecord(logger.name, level, __file__, 0, "request", (), None, None, fields)
    )


def _protocol(path: str) -> str | None:
    if path.startswith("/v2"):
        return "v2"
    if path.startswith("/v1"):
        return "v1"
    return None


class AccessLogMiddleware:
    """Request ids and access lines for the control plane, and its last error boundary: an
    exception no handler took is logged with its traceback and answers a JSON 500."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request = request_id(scope)
        header = (REQUEST_ID, request.encode())
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        error: str | None = None
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # the control plane's HTTP boundary, as _serve is the fast path's
            logger.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            error = "InternalError"
            if status == 0:
                fault = errors.ServiceError("internal error; see the server log")
                await send_response(
                    send, 500, error_body(fault, request), [*error_headers(fault), header]
                )
                status = 500
        if error is None and status >= 400:
            error = noted_error(scope)
        quiet = scope["path"] in _QUIET_PATHS or (
            scope["method"] == "GET" and status < 400 and _from_status_page(scope)
        )
        # Routing has put the path parameters into the scope by now.
        params = scope.get("path_params", {})
        log_request(
            request,
            asked_method(scope),
            scope["path"],
            status,
            time.perf_counter() - started,
            model=params.get("name"),
            version=params.get("version"),
            protocol=_protocol(scope["path"]),
            error=error,
            level=logging.DEBUG if quiet else logging.INFO,
        )
