"""Access logs and request ids: one log line per request, for the fast path and the control plane.

Every response carries `X-Request-ID`: the client's own when it is short and printable, else a
new one. A line names the model, version, protocol, status, duration and rows, never a value
from the request body.
"""

import logging
import time
import uuid
from typing import Any

from service import errors
from service.server.http import (
    Message,
    Receive,
    Scope,
    Send,
    error_body,
    error_headers,
    send_response,
)

# Named as before the package was split: log pipelines filter on it.
logger = logging.getLogger("service.access")

REQUEST_ID = b"x-request-id"
# Probes and scrapes come every few seconds; at debug level they do not bury the requests.
_QUIET_PATHS = frozenset({"/", "/metrics", "/v2/health/live", "/v2/health/ready"})


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
    return uuid.uuid4().hex


def request_id_from(value: str | None) -> str:
    """The same for an id given as text (gRPC metadata)."""
    if value is not None and value.isascii() and _printable(value.encode()):
        return value
    return uuid.uuid4().hex


def log_request(
    request: str,
    scope: Scope,
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
    fields = {
        "request_id": request,
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "model": model,
        "version": version,
        "protocol": protocol,
        "rows": rows,
        "error": error,
    }
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
        quiet = scope["path"] in _QUIET_PATHS
        # Routing has put the path parameters into the scope by now.
        params = scope.get("path_params", {})
        log_request(
            request,
            scope,
            status,
            time.perf_counter() - started,
            model=params.get("name"),
            version=params.get("version"),
            protocol=_protocol(scope["path"]),
            error=error,
            level=logging.DEBUG if quiet else logging.INFO,
        )
