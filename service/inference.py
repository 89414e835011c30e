"""The hot inference path as plain ASGI, in front of FastAPI.

V2 `infer` and V1 `predict` requests are matched by one regular expression and served here,
skipping the per-request routing, dependency and validation machinery of the framework: on
single-row requests that machinery costs more than the model. Every other request passes
through to FastAPI.
"""

import logging
import re
import time
from typing import Any

from service import errors
from service.http import (
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
from service.protocols import v1, v2
from service.registry import ModelVersion
from service.router import Router
from service.state import ServiceState

logger = logging.getLogger(__name__)

_ROUTE = re.compile(
    r"/v2/models/(?P<v2name>[^/]+)(?:/versions/(?P<v2version>[^/]+))?/infer"
    r"|/v1/models/(?P<v1name>[^/:]+)(?:/versions/(?P<v1version>[^/:]+))?:predict"
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
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _ROUTE.fullmatch(scope["path"])
        state: ServiceState | None = getattr(scope["app"].state, "service", None)
        if match is None or state is None:
            await self.app(scope, receive, send)
            return
        await _serve(state, match, scope, receive, send)


async def _serve(
    state: ServiceState, match: re.Match[str], scope: Scope, receive: Receive, send: Send
) -> None:
    started = time.perf_counter()
    protocol = "v2" if match["v2name"] is not None else "v1"
    model: ModelVersion | None = None
    metrics = state.metrics
    metrics.inflight.inc()
    try:
        _check_content_type(scope)
        body = await read_body(scope, receive, state.settings.max_request_bytes)
        if protocol == "v2":
            model = state.router.resolve(match["v2name"], match["v2version"])
            status, payload, headers = await _infer_v2(state.router, model, scope, body)
        else:
            model = state.router.resolve(match["v1name"], match["v1version"])
            tensors = v1.decode_predict_request(model, body)
            prediction = await state.router.predict(model, tensors)
            status, payload, headers = (
                200,
                v1.encode_predict_response(model, prediction.outputs),
                _JSON,
            )
    except errors.ServiceError as exc:
        status, payload, headers = status_of(exc), error_body(exc), error_headers(exc)
    except Exception:  # the HTTP boundary: a bug answers 500 without a traceback, and is logged
        logger.exception("unexpected error serving %s", scope["path"])
        fault = errors.ServiceError("internal error; see the server log")
        status, payload, headers = 500, error_body(fault), error_headers(fault)
    finally:
        metrics.inflight.dec()
    if model is not None:
        labels = (model.name, str(model.version))
        metrics.requests.labels(*labels, protocol, str(status)).inc()
        metrics.request_duration.labels(*labels, protocol).observe(time.perf_counter() - started)
    await send_response(send, status, payload, headers)


async def _infer_v2(
    router: Router, model: ModelVersion, scope: Scope, body: bytes
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    call = v2.decode_infer_request(body, header(scope, v2.HEADER_LENGTH.encode()))
    wanted = v2.select_outputs(model, call)
    prediction = await router.predict(model, call.tensors)
    payload, json_length = v2.encode_infer_response(model, call, prediction.outputs, wanted)
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
