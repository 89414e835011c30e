"""The request boundary, one table: every inference-like route against every property it owns.

Draining, credentials, request ids, the in-flight gauge, the deadline, error mapping, metrics
and the access line are written once; these tests prove each route goes through all of them,
on a real server over real HTTP.
"""

import gzip
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.rawhttp import answer_length
from tests.scrape import access_lines, scrape, total
from tests.serving import RunningServer, run_server, wait_for

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
KEY = "boundary-key"
AUTH = {"X-API-Key": KEY}
IRIS_CSV = b"sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n"


@dataclass(frozen=True)
class Route:
    protocol: str
    path: str  # for the model iris; {model} is replaced
    content_type: str
    good: bytes
    bad: bytes  # resolves the model, then fails as invalid input

    def url(self, server: RunningServer, model: str = "iris") -> str:
        return server.url + self.path.format(model=model)


ROUTES = [
    Route(
        "v2",
        "/v2/models/{model}/infer",
        "application/json",
        b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}',
        b'{"inputs":[{"name":"input","shape":[1,3],"datatype":"FP32","data":[5.1,3.5,1.4]}]}',
    ),
    Route(
        "v1",
        "/v1/models/{model}:predict",
        "application/json",
        b'{"instances":[[5.1,3.5,1.4,0.2]]}',
        b'{"instances":[[5.1,3.5,1.4]]}',
    ),
    Route(
        "score",
        "/v1/models/{model}:score",
        "text/csv",
        IRIS_CSV,
        b"sepal_length,sepal_width\n5.1,3.5\n",
    ),
]
IDS = [r.protocol for r in ROUTES]


def _env(**extra: str) -> dict[str, str]:
    return {
        "MODELSERVE_API_KEYS": KEY,
        "MODELSERVE_LOG_FORMAT": "json",
        "MODELSERVE_REQUEST_TIMEOUT_S": "1.5",
        **extra,
    }


@pytest.fixture(scope="module")
def guarded(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A server with API keys, JSON access lines and a short deadline."""
    with run_server(trained_repository, tmp_path_factory.mktemp("boundary"), env=_env()) as server:
        yield server


def _post(route: Route, url: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        url, content=body, headers={"Content-Type": route.content_type, **headers}, timeout=30
    )


def _access_line(server: RunningServer, request_id: str) -> dict[str, object]:
    def logged() -> bool:
        return any(e["request_id"] == request_id for e in access_lines(server.output()))

    wait_for(logged, what=f"access line of {request_id}")
    lines = [e for e in access_lines(server.output()) if e["request_id"] == request_id]
    assert len(lines) == 1, lines  # one line per request, whatever the route
    return lines[0]


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_credentials_are_checked(guarded: RunningServer, route: Route) -> None:
    refused = _post(
        route, route.url(guarded), route.good, **{"X-Request-ID": f"nokey-{route.protocol}"}
    )
    assert refused.status_code == 401
    assert refused.json()["type"] == "Unauthorized"
    assert "API key" in refused.json()["error"]
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.headers["x-request-id"] == f"nokey-{route.protocol}"
    assert _post(route, route.url(guarded), route.good, **AUTH).status_code == 200


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_request_ids_are_honoured_or_generated(guarded: RunningServer, route: Route) -> None:
    given = _post(route, route.url(guarded), route.good, **AUTH, **{"X-Request-ID": "given-7"})
    assert given.status_code == 200
    assert given.headers["x-request-id"] == "given-7"
    fresh = _post(route, route.url(guarded), route.good, **AUTH)
    assert fresh.status_code == 200
    assert len(fresh.headers["x-request-id"]) == 32
    assert fresh.headers["x-request-id"] != "given-7"


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_errors_map_to_status_and_json(guarded: RunningServer, route: Route) -> None:
    unknown = _post(route, route.url(guarded, "no-such-model"), route.good, **AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["type"] == "ModelNotFound"
    assert "no-such-model" in unknown.json()["error"]
    bad = _post(route, route.url(guarded), route.bad, **AUTH)
    assert bad.status_code == 400
    assert bad.json()["type"] == "InvalidInput"
    assert "feature" in bad.json()["error"]  # names what is wrong with the input


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_metrics_time_successes_and_count_errors_by_code(
    guarded: RunningServer, route: Route
) -> None:
    labels = {"model": "iris", "protocol": route.protocol}
    before = scrape(guarded.url)
    assert _post(route, route.url(guarded), route.good, **AUTH).status_code == 200
    assert _post(route, route.url(guarded), route.bad, **AUTH).status_code == 400
    after = scrape(guarded.url)

    def delta(name: str, **extra: str) -> float:
        return total(after, name, **labels, **extra) - total(before, name, **labels, **extra)

    assert delta("modelserve_requests_total", code="200") == 1
    assert delta("modelserve_requests_total", code="400") == 1
    # The latency histogram holds successes only: the failed request is not in it.
    assert delta("modelserve_request_duration_seconds_count") == 1


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_one_access_line_per_request(guarded: RunningServer, route: Route) -> None:
    ok_id, bad_id = f"line-ok-{route.protocol}", f"line-bad-{route.protocol}"
    assert _post(
        route, route.url(guarded), route.good, **AUTH, **{"X-Request-ID": ok_id}
    ).is_success
    _post(route, route.url(guarded), route.bad, **AUTH, **{"X-Request-ID": bad_id})
    ok, bad = _access_line(guarded, ok_id), _access_line(guarded, bad_id)
    assert (ok["protocol"], ok["status"], ok["model"], ok["rows"]) == (
        route.protocol,
        200,
        "iris",
        1,
    )
    assert ok["version"] == "2"  # the default version, resolved
    assert (bad["status"], bad["error"], bad["rows"]) == (400, "InvalidInput", 0)


def _open_request(server: RunningServer, route: Route) -> socket.socket:
    """A request whose headers are sent and whose body is not: it stays in flight."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST {route.path.format(model='iris')} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: {route.content_type}\r\nX-API-Key: {KEY}\r\n"
        f"Content-Length: {len(route.good) + 100}\r\n\r\n"
    )
    sock.sendall(head.encode() + route.good[:5])
    return sock


def _status_line(sock: socket.socket) -> bytes:
    """The whole answer: its head, then as many body bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data or len(data) < answer_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_in_flight_gauge_and_deadline(guarded: RunningServer, route: Route) -> None:
    sock = _open_request(guarded, route)
    try:
        wait_for(
            lambda: total(scrape(guarded.url), "modelserve_inflight_requests") >= 1,
            what="the request to count as in flight",
        )
        started = time.monotonic()
        answer = _status_line(sock)  # the body never completes: the deadline answers
        assert answer.startswith(b"HTTP/1.1 504"), answer[:200]
        assert b"DeadlineExceeded" in answer
        assert b"x-request-id: " in answer
        assert time.monotonic() - started < 5
    finally:
        sock.close()
    wait_for(
        lambda: total(scrape(guarded.url), "modelserve_inflight_requests") == 0,
        what="the in-flight gauge to come back to zero",
    )


def test_draining_refuses_every_route(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = _env(MODELSERVE_SHUTDOWN_DELAY_S="20", MODELSERVE_GRACEFUL_SHUTDOWN_S="5")
    with run_server(trained_repository, tmp_path_factory.mktemp("draining"), env=env) as server:
        server.process.send_signal(signal.SIGTERM)
        wait_for(
            lambda: httpx.get(f"{server.url}/v2/health/ready").status_code == 503,
            what="readiness to fail once draining",
        )
        for route in ROUTES:
            refused = _post(route, route.url(server), route.good, **AUTH, **{"X-Request-ID": "d-1"})
            assert refused.status_code == 503, route.protocol
            assert refused.json()["type"] == "Overloaded"
            assert "shutting down" in refused.json()["error"]
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["connection"] == "close"
            assert refused.headers["x-request-id"] == "d-1"
        # Checked: the rest of the 20 s drain (long enough for a busy machine) is not waited.
        server.process.kill()


@pytest.mark.parametrize("route", ROUTES, ids=IDS)
def test_compressed_bodies_are_refused_naming_the_coding(
    guarded: RunningServer, route: Route
) -> None:
    headers = {**AUTH, "Content-Encoding": "gzip", "X-Request-ID": f"gzip-{route.protocol}"}
    refused = _post(route, route.url(guarded), gzip.compress(route.good), **headers)
    assert refused.status_code == 415, refused.text
    assert refused.json()["type"] == "UnsupportedMediaType"
    assert "Content-Encoding 'gzip' is not supported" in refused.json()["error"]
    assert "uncompressed" in refused.json()["error"]
    assert refused.headers["x-request-id"] == f"gzip-{route.protocol}"
    plain = _post(route, route.url(guarded), route.good, **AUTH, **{"Content-Encoding": "identity"})
    assert plain.status_code == 200


def test_the_readme_lists_every_protocol_label(guarded: RunningServer) -> None:
    for route in ROUTES:
        assert _post(route, route.url(guarded), route.good, **AUTH).status_code == 200
    seen = {
        dict(labels)["protocol"]
        for name, labels in scrape(guarded.url)
        if name == "modelserve_requests_total"
    }
    row = next(
        line for line in README.splitlines() if line.startswith("| `modelserve_requests_total`")
    )
    listed = set(re.findall(r"`(\w+)`", row.split("`protocol` is", 1)[1]))
    assert seen == {route.protocol for route in ROUTES}
    assert seen <= listed, f"README lists {sorted(listed)}"
