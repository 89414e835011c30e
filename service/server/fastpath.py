"""The hot inference path as plain ASGI, in front of FastAPI.

V2 `infer`, V1 `predict` and `:score` requests are matched by one regular expression and served
here through the request boundary, skipping the per-request routing, dependency and validation
machinery of the framework: on single-row requests that machinery costs more than the model.
Every other request passes through to FastAPI.
"""

import re
from typing import Any

from fastapi import FastAPI
from numpy.typing import NDArray

from service import errors
from service.protocols import v1, v2
from service.protocols.arrays import NULL_VALUES
from service.server import boundary
from service.server.boundary import Answer, Exchange
from service.server.http import (
    Receive,
    Scope,
    Send,
    answered_as,
    error_body,
    error_headers,
    header,
    read_body,
    send_response,
)
from service.server.jobs import jobs_handler
from service.server.memory import Reservation
from service.server.score import serve_score
from service.server.state import ServiceState

_ROUTE = re.compile(
    r"/v2/models/(?P<v2name>[^/]*)(?:/versions/(?P<v2version>[^/]*))?/infer"
    r"|/v1/models/(?P<v1name>[^/]*)(?:/versions/(?P<v1version>[^/]*))?:predict"
    r"|/v1/models/(?P<scorename>[^/]*)(?:/versions/(?P<scoreversion>[^/]*))?:score"
    r"|(?P<jobs>/v1/jobs)(?:/(?P<job>[^/]+)(?P<result>/result)?)?"
)
# A V1 verb the routes above do not serve: the framework would take `name:verb` for a model
# name and answer 405 (its GET route), where no such endpoint is a 404.
_V1_VERB = re.compile(r"/v1/models/[^/:]*(?:/versions/[^/:]*)?:(?P<verb>[^/]*)")
# Probes and load balancers that check with HEAD: answered as GET (the server sends no body).
_HEAD_AS_GET = frozenset({"/", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready"})
_JSON = [(b"content-type", b"application/json")]
# The state, protocol, path names and handler of a request the boundary serves.
DirectRoute = tuple[ServiceState, str, tuple[str, str | None], boundary.Handler]
_BINARY_TYPES = ("application/json", "application/octet-stream")
_V1_TYPES = ("application/json",)  # V1 has no binary extension


def _check_content_type(scope: Scope, accepted: tuple[str, ...] = _BINARY_TYPES) -> None:
    content_type = header(scope, b"content-type")
    if content_type is None:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in accepted:
        binary = " (or application/octet-stream with the binary tensor extension)"
        raise errors.UnsupportedMediaType(
            f"content type {media_type!r} is not accepted here; send application/json"
            f"{binary if len(accepted) > 1 else ''}; curl -d needs "
            "-H 'Content-Type: application/json'"
        )


class InferenceMiddleware:
    """Wraps the FastAPI application, whose lifespan puts the ServiceState on app.state.

    Outside the framework's own middleware (error pages, telemetry, body limits), which
    would add their work and a send wrapper each to every inference request; this path
    has the request boundary and its own body limit.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def direct_route(self, path: str) -> "DirectRoute | None":
        """What serves a V2 `infer` or V1 `predict` request for `path` once the service runs:
        for the connection's own request cycle, which skips the ASGI server's."""
        state: ServiceState | None = getattr(self.app.state, "service", None)
        match = _ROUTE.fullmatch(path)
        if match is None or state is None or match["jobs"] is not None:
            return None
        protocol, names, handler = _inference_route(match)
        return None if protocol == "score" else (state, protocol, names, handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD" and scope["path"] in _HEAD_AS_GET:
            scope = answered_as(scope, "GET")
        match = _ROUTE.fullmatch(scope["path"])
        state: ServiceState | None = getattr(self.app.state, "service", None)
        if match is None or state is None:
            verb = _V1_VERB.fullmatch(scope["path"])
            if verb is not None:
                missing = errors.RouteNotFound(
                    f"no endpoint :{verb['verb']}; a V1 model answers POST :predict, and "
                    "POST :score with a file"
                )
                await send_response(send, 404, error_body(missing), error_headers(missing))
                return
            await self.app(scope, receive, send)
            return
        if match["jobs"] is not None:
            handler = jobs_handler(scope["method"], match["job"], match["result"] is not None)
            await boundary.serve(state, scope, receive, send, "jobs", ("", None), handler)
            return
        if scope["method"] != "POST":
            wrong = errors.MethodNotAllowed(f"{scope['method']} is not allowed here; send POST")
            await send_response(send, 405, error_body(wrong), error_headers(wrong))
            return
        protocol, names, handler = _inference_route(match)
        await boundary.serve(state, scope, receive, send, protocol, names, handler)


def _inference_route(
    match: "re.Match[str]",
) -> tuple[str, tuple[str, str | None], boundary.Handler]:
    """The protocol, path names and handler of a matched V2, V1 or :score path."""
    if match["v2name"] is not None:
        return "v2", (match["v2name"], match["v2version"]), _infer_v2
    if match["v1name"] is not None:
        return "v1", (match["v1name"], match["v1version"]), _predict_v1
    return "score", (match["scorename"], match["scoreversion"]), serve_score


def _rows(tensors: dict[str, NDArray[Any]]) -> int:
    first = next(iter(tensors.values()), None)
    return 0 if first is None else (first.shape[0] if first.ndim else 1)


def _routing_key(scope: Scope) -> str | None:
    """X-Routing-Key: requests that carry the same key reach the same version of a split."""
    return header(scope, b"x-routing-key")


def _hand_over(tensors: dict[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
    """The tensors in a new dict, the old one emptied: whoever takes them holds the only
    reference, so the router can free the decoded arrays once it has their conformed copies."""
    taken = dict(tensors)
    tensors.clear()
    return taken


async def _read(
    exchange: Exchange, reservation: Reservation, accepted: tuple[str, ...] = _BINARY_TYPES
) -> bytes | bytearray:
    _check_content_type(exchange.scope, accepted)
    limit = exchange.state.settings.max_request_bytes
    return await read_body(exchange.scope, exchange.receive, limit, reservation.grow)


async def _infer_v2(exchange: Exchange) -> Answer:
    state, scope = exchange.state, exchange.scope
    split = header(scope, v2.HEADER_LENGTH.encode())
    with state.memory.reservation() as reservation:
        body = await _read(exchange, reservation)
        model = exchange.model = state.router.resolve(*exchange.names, _routing_key(scope))
        try:
            call = v2.decode_infer_request(body, split, state.settings.max_batch_rows)
        except errors.InvalidInput as refused:
            # JSON has no NaN: a model that takes missing values takes them as nulls. Decoded
            # again only then, so that other requests pay nothing for it.
            if NULL_VALUES not in refused.message or not model.allow_nan:
                raise
            call = v2.decode_infer_request(body, split, state.settings.max_batch_rows, True)
        del body  # what the tensors do not view is garbage from here
        key = call.parameters.get("routing_key")
        if key is not None:
            if not isinstance(key, str):
                raise errors.InvalidInput("parameters.routing_key must be a string")
            # Resolved again only when the key is in the body: a split is by key.
            model = exchange.model = state.router.resolve(*exchange.names, key)
        exchange.rows = _rows(call.tensors)
        timeout_s = v2.requested_timeout_s(call)
        if timeout_s is not None:
            exchange.shorten_deadline(timeout_s)
        wanted = v2.select_outputs(model, call)
        # The request's arrays go to the router, which keeps only their conformed copies.
        prediction = await state.router.predict(
            model, _hand_over(call.tensors), exchange.request_id
        )
        payload, json_length = v2.encode_infer_response_parts(model, call, prediction, wanted)
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


async def _predict_v1(exchange: Exchange) -> Answer:
    state = exchange.state
    with state.memory.reservation() as reservation:
        body = await _read(exchange, reservation, _V1_TYPES)
        model = exchange.model = state.router.resolve(*exchange.names, _routing_key(exchange.scope))
        tensors = v1.decode_predict_request(model, body, state.settings.max_batch_rows)
        del body
        exchange.rows = _rows(tensors)
        prediction = await state.router.predict(model, _hand_over(tensors), exchange.request_id)
        return 200, v1.encode_predict_response(model, prediction), _JSON
