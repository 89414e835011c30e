"""Request heads are bounded in size and in time on a real server, over raw sockets."""

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pytest

from service.server.allocator import QUIET_S
from tests.rawhttp import RawResponse, exchange, flood_heads, parse_response, request_head
from tests.serving import RunningServer, memory, reset_peak_memory, run_server, wait_for

MiB = 2**20
LIMIT = 65536  # MODELSERVE_MAX_HEADER_BYTES by default
LONG_KEY = "k" * 8192  # an 8 KB API key: sent as an 8 KB Authorization header
HEADERS_TOO_LARGE = {
    "error": f"request headers are over the limit of {LIMIT} bytes; "
    "send fewer or shorter header fields",
    "type": "HeadersTooLarge",
}
INFER = "/v2/models/iris/infer"
ROW = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5, 3, 1, 0]}]}


@pytest.fixture(scope="module")
def server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = {"MODELSERVE_API_KEYS": LONG_KEY, "MODELSERVE_HEADER_TIMEOUT_S": "1"}
    with run_server(trained_repository, tmp_path_factory.mktemp("logs"), env=env) as running:
        yield running


def infer(server: RunningServer) -> httpx.Response:
    headers = {"Authorization": f"Bearer {LONG_KEY}"}
    return httpx.post(f"{server.url}{INFER}", json=ROW, headers=headers)


@pytest.mark.parametrize("one_line", [False, True], ids=["many lines", "one endless line"])
def test_floods_of_header_bytes_are_refused_as_they_arrive(
    server: RunningServer, one_line: bool
) -> None:
    pid = server.process.pid
    assert infer(server).status_code == 200
    before = memory(pid)
    reset_peak_memory(pid)
    floods = flood_heads(server.url, 100, budget=100 * MiB, seconds=5, one_line=one_line)
    peak, after = memory(pid, "VmHWM"), memory(pid)
    for flood in floods:
        # Refused with an answer, or at least cut off, long before the client's 100 MB.
        assert flood.closed
        assert flood.answer is None or flood.answer.status in (400, 431)
        assert flood.sent < 16 * MiB
    answers = [flood.answer for flood in floods if flood.answer is not None]
    assert answers, "no connection was answered"
    assert answers[0].json() == HEADERS_TOO_LARGE
    assert peak - before < 50 * MiB, f"peak {peak / MiB:.0f} MiB from {before / MiB:.0f} MiB"
    assert after - before < 50 * MiB
    assert infer(server).status_code == 200


AUTHORIZATION = len(f"Authorization: Bearer {LONG_KEY}\r\n")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # the 8 KB Authorization header alone
        ({f"X-Pad-{i}": "a" * 1000 for i in range(50)}, 200),
        ({"X-Pad": "a" * (LIMIT - AUTHORIZATION - 400)}, 200),
        ({f"X-Pad-{i}": "a" * 1000 for i in range(60)}, 431),
        ({"X-Pad": "a" * LIMIT}, 431),
    ],
    ids=["8 KB", "58 KB in lines", "just under the limit", "68 KB in lines", "one line over"],
)
def test_heads_up_to_the_limit_are_served(
    server: RunningServer, headers: dict[str, str], status: int
) -> None:
    body = orjson.dumps(ROW)
    headers = {"Authorization": f"Bearer {LONG_KEY}", "Content-Type": "application/json", **headers}
    answer = exchange(server.url, request_head("POST", INFER, headers, length=len(body)), (body,))
    assert answer is not None
    assert answer.status == status, answer.body
    if status == 431:
        assert answer.json() == HEADERS_TOO_LARGE


def slow_head(url: str, *, answered_first: bool, send: bool) -> tuple[float, RawResponse | None]:
    """Sends a request head one short header line at a time every 0.2 s (or nothing), until the
    server answers or closes; returns how long that took and the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        if answered_first:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while not received.endswith(b"}"):
                received += sock.recv(65536)
        sock.settimeout(0.2)
        started = time.monotonic()
        if send:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        received = b""
        while time.monotonic() - started < 10:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if send:
                    sock.sendall(b"X-Slow: a\r\n")
                continue
            received += data
            if not data:
                break
    return time.monotonic() - started, parse_response(received) if received else None


@pytest.mark.parametrize(
    ("answered_first", "send"),
    [(False, True), (True, True), (False, False)],
    ids=["slow head", "slow head after an answer", "nothing sent"],
)
def test_heads_not_received_in_time_get_408(
    server: RunningServer, answered_first: bool, send: bool
) -> None:
    took, answer = slow_head(server.url, answered_first=answered_first, send=send)
    assert_head_timed_out(answer, 1, took)
    assert infer(server).status_code == 200


def assert_head_timed_out(answer: RawResponse | None, seconds: int, took: float) -> None:
    assert answer is not None
    assert answer.status == 408
    assert answer.json() == {
        "error": f"request headers were not received within {seconds} s",
        "type": "HeadersTimeout",
    }
    assert seconds - 0.1 < took < seconds + 2


def read_answers(sock: socket.socket) -> list[RawResponse]:
    """The answers on a connection, in order, until the server closes it."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = parse_response(head + b"\r\n\r\n").headers.get("content-length", "0")
        answers.append(parse_response(head + b"\r\n\r\n" + rest[: int(length)]))
        data = rest[int(length) :]
    return answers


@pytest.mark.parametrize(("early", "late", "status"), [(0, 0, 200), (60_000, 10_000, 431)])
def test_pipelined_heads_are_measured_apart(
    server: RunningServer, early: int, late: int, status: int
) -> None:
    # A request with a 200 KB body, then the next request's head: its start (with `early` bytes
    # of a header) sent with the first request, and the rest (`late` more) once that is
    # answered. The first request's bytes must not count towards the second head, and the
    # second head's bytes that shared a read with the first request must.
    body = b" " * 200_000 + orjson.dumps(ROW)
    first = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {LONG_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    second = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * early
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(first + second)
        time.sleep(0.3)
        sock.sendall(b"a" * late + b"\r\nConnection: close\r\n\r\n")
        answers = read_answers(sock)
    assert [answer.status for answer in answers] == [200, status]


# Small inference requests are read and answered by the connection's own request cycle; the rest
# by uvicorn's. A query string sends a request the ASGI way, so the two can be compared.


def infer_request(path: str, request_id: str, *, close: bool = False) -> bytes:
    body = orjson.dumps({"id": request_id, **ROW})
    headers = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Authorization: Bearer {LONG_KEY}",
        "Content-Type: application/json",
        f"X-Request-ID: {request_id}",
        f"Content-Length: {len(body)}",
    ]
    if close:
        headers.append("Connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def json_head(length: int, extra: str = "") -> bytes:
    """The head of a V2 JSON infer request with a body of `length` bytes."""
    return (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {LONG_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n{extra}\r\n"
    ).encode()


@contextmanager
def connections_sending(
    server: RunningServer, count: int, data: bytes, answered: bool
) -> Iterator[None]:
    """`count` connections each sending `data` (and reading its answer, if `answered`),
    open until the block ends."""
    parts = urlsplit(server.url)
    connections = []
    try:
        for _ in range(count):
            sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
            connections.append(sock)
            sock.sendall(data)
            answer = b""
            while answered and (b"\r\n\r\n" not in answer or not answer.endswith(b"}")):
                answer += sock.recv(65536)
            assert not answered or answer.startswith(b"HTTP/1.1 200"), answer[:100]
        yield
    finally:
        for sock in connections:
            sock.close()


def test_both_request_cycles_answer_alike(server: RunningServer) -> None:
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(infer_request(INFER, "direct"))  # ids of one length: bodies of one length
        time.sleep(0.3)  # answered before the next is sent: not pipelined
        sock.sendall(infer_request(INFER + "?via=asgi", "asgi--", close=True))
        direct, asgi = read_answers(sock)
    assert direct.status == asgi.status == 200
    assert direct.headers.keys() | {"connection"} == asgi.headers.keys()
    for name in ("content-type", "content-length", "server"):
        assert direct.headers[name] == asgi.headers[name]
    assert (direct.headers["x-request-id"], asgi.headers["x-request-id"]) == ("direct", "asgi--")
    assert {**orjson.loads(direct.body), "id": "asgi--"} == orjson.loads(asgi.body)
    assert "connection" not in direct.headers
    assert asgi.headers["connection"] == "close"


def test_pipelined_requests_are_answered_in_order(server: RunningServer) -> None:
    parts = urlsplit(server.url)
    ids = [f"p{i}" for i in range(5)]
    requests = [infer_request(INFER, i, close=i == ids[-1]) for i in ids]
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(b"".join(requests))
        answers = read_answers(sock)
    assert [answer.status for answer in answers] == [200] * len(ids)
    assert [orjson.loads(answer.body)["id"] for answer in answers] == ids
    assert [answer.headers["x-request-id"] for answer in answers] == ids


def test_a_body_sent_in_pieces_is_served(server: RunningServer) -> None:
    # Not whole with its head: the request starts, and waits for its body under its deadline.
    request = infer_request(INFER, "pieces", close=True)
    head_end = request.index(b"\r\n\r\n") + 4
    pieces = [request[:head_end], request[head_end : head_end + 10], request[head_end + 10 :]]
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.2)
        (answer,) = read_answers(sock)
    assert answer.status == 200, answer.body
    assert orjson.loads(answer.body)["id"] == "pieces"


def whole_and_in_pieces(
    server: RunningServer, head: Callable[[str], bytes], body: bytes, cut: int
) -> tuple[RawResponse, RawResponse]:
    """The answers to one request sent whole ("whole-"), then with its body cut at `cut` and
    the rest sent 0.2 s later ("pieces"); `head` makes its head with `extra` header lines."""
    parts = urlsplit(server.url)
    answers = []
    for request_id, pause in (("whole-", False), ("pieces", True)):
        request = head(f"X-Request-ID: {request_id}\r\nConnection: close\r\n") + body
        at = len(request) - len(body) + cut if pause else len(request)
        with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
            sock.sendall(request[:at])
            if pause:
                time.sleep(0.2)
                sock.sendall(request[at:])
            (answer,) = read_answers(sock)
        answers.append(answer)
    return answers[0], answers[1]


def test_a_large_body_is_answered_alike_whole_or_in_pieces(server: RunningServer) -> None:
    # A body of up to one read is served by the connection's cycle, whether it comes with its
    # head or in later reads.
    body = b" " * 200_000 + orjson.dumps(ROW)
    whole, pieces = whole_and_in_pieces(
        server, lambda extra: json_head(len(body), extra), body, 100_000
    )
    assert whole.status == pieces.status == 200, (whole.body, pieces.body)
    assert (whole.headers["x-request-id"], pieces.headers["x-request-id"]) == ("whole-", "pieces")
    assert whole.body == pieces.body
    assert whole.headers.keys() == pieces.headers.keys()


def test_a_binary_answer_is_sent_alike_by_both_cycles(server: RunningServer) -> None:
    # Its JSON header and each tensor go out as pieces: written together by the connection's
    # cycle, one body message each through uvicorn's (a query string sends a request there).
    rows = np.tile(np.asarray(ROW["inputs"][0]["data"], dtype="<f4"), (1000, 1))
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    body = header + rows.tobytes()

    def head(extra: str, path: str = INFER) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {LONG_KEY}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\n{extra}\r\n"
        ).encode()

    whole, pieces = whole_and_in_pieces(server, head, body, len(body) // 2)
    _, asgi = whole_and_in_pieces(server, lambda extra: head(extra, INFER + "?via=asgi"), body, 0)
    assert whole.status == pieces.status == asgi.status == 200, (whole.body, asgi.body)
    assert whole.body == pieces.body == asgi.body
    assert int(whole.headers["content-length"]) == len(whole.body)
    split = int(whole.headers["inference-header-content-length"])
    tensors, start = {}, split
    for output in orjson.loads(whole.body[:split])["outputs"]:
        end = start + output["parameters"]["binary_data_size"]
        tensors[output["name"]] = whole.body[start:end]
        start = end
    assert start == len(whole.body)
    probabilities = np.frombuffer(tensors["probabilities"], dtype="<f4").reshape(1000, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ("X-Forwarded-For: 10.1.2.3\r\n", 200),  # a proxy's request: uvicorn's cycle
        ("Expect: 100-continue\r\n", 200),
    ],
    ids=["forwarded", "expect"],
)
def test_requests_that_need_the_asgi_cycle_are_served(
    server: RunningServer, extra: str, status: int
) -> None:
    request = infer_request(INFER, "other", close=True)
    head_end = request.index(b"\r\n\r\n") + 2
    request = request[:head_end] + extra.encode() + request[head_end:]
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(request)
        answers = read_answers(sock)
    assert answers[-1].status == status, answers[-1].body


def test_an_empty_body_is_answered_as_invalid_input(server: RunningServer) -> None:
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {LONG_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    answer = exchange(server.url, head)
    assert answer is not None
    assert answer.status == 400, answer.body
    error = answer.json()
    assert isinstance(error, dict)
    assert error["type"] == "InvalidInput"
    assert "disconnected" not in error["error"], error  # an empty body is a body


def test_a_pipelining_client_that_reads_no_answers_holds_little_memory(
    server: RunningServer,
) -> None:
    # Requests sent back to back on four connections for 4 s, none of the answers read: the
    # server must stop reading once a few dozen wait, not parse every read into requests.
    pid = server.process.pid
    assert infer(server).status_code == 200
    before = memory(pid)
    reset_peak_memory(pid)
    request = infer_request(INFER, "flood")
    blob = request * 1000
    parts = urlsplit(server.url)
    sent = []
    deadline = time.monotonic() + 4

    def flood() -> None:
        with socket.create_connection((parts.hostname, parts.port), timeout=0.5) as sock:
            view, offset, total = memoryview(blob), 0, 0
            while time.monotonic() < deadline:
                try:
                    count = sock.send(view[offset:])
                except TimeoutError:
                    continue  # the server stopped reading, as it should
                offset, total = (offset + count) % len(blob), total + count
        sent.append(total)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = memory(pid, "VmHWM")
    assert sum(sent) > 2 * MiB  # enough to have grown a worker by gigabytes before
    assert peak - before < 60 * MiB, f"peak {peak / MiB:.0f} MiB from {before / MiB:.0f} MiB"
    assert infer(server).status_code == 200
    time.sleep(0.5)  # for the closed connections' requests to finish
    assert "Traceback" not in server.output()


def test_a_slow_head_after_an_answer_gets_408_when_keep_alive_is_shorter(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # With the head's time (6 s) longer than uvicorn's keep-alive (5 s), an idle connection is
    # closed by keep-alive, and the head's timer starts only once a head begins to arrive: it
    # must still end the head 6 s after the previous answer.
    env = {"MODELSERVE_HEADER_TIMEOUT_S": "6"}
    with run_server(trained_repository, tmp_path_factory.mktemp("logs"), env=env) as slow:
        took, answer = slow_head(slow.url, answered_first=True, send=True)
    assert_head_timed_out(answer, 6, took)


def test_idle_connections_do_not_keep_their_last_request_body(server: RunningServer) -> None:
    # Each connection sends one request with a body of about 60 KB (whitespace before the JSON)
    # and stays open, as a keep-alive client between requests does.
    pid = server.process.pid
    body = b" " * 60_000 + orjson.dumps(ROW)
    assert infer(server).status_code == 200
    before = memory(pid)
    with connections_sending(server, 600, json_head(len(body)) + body, answered=True):
        held = memory(pid) - before
    # 600 bodies of 60 KB would be 36 MB.
    assert held < 20 * MiB, f"{held / MiB:.0f} MiB held by 600 idle connections"


def test_memory_read_for_a_burst_of_bodies_is_given_back_once_requests_stop(
    server: RunningServer,
) -> None:
    # Each client sends most of a 250 KB body and leaves: what was read of the bodies is freed,
    # in pieces below the mmap threshold, within the worker's heap. Once no request has come
    # for QUIET_S, the worker gives its free heap pages back.
    pid = server.process.pid
    assert infer(server).status_code == 200
    before = memory(pid)
    with connections_sending(server, 400, json_head(250_000) + b" " * 120_000, answered=False):
        wait_for(lambda: memory(pid) - before > 30 * MiB, 20, "the bodies read")
        held = memory(pid) - before
    wait_for(lambda: memory(pid) - before < held / 3, 4 * QUIET_S, "memory given back")


def answered_then_sending(
    server: RunningServer, head: bytes, seconds: float
) -> tuple[bytes, float]:
    """Sends `head`, reads its answer, then sends body bytes for up to `seconds`: the answer, and
    how long the server let the body flow after it."""
    parts = urlsplit(server.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(head)
        answer = sock.recv(65536)
        started = time.monotonic()
        try:
            while time.monotonic() - started < seconds:
                sock.sendall(b"7" * 65536)
        except OSError:  # reset or broken pipe: the server closed the connection
            pass
        return answer, time.monotonic() - started


@pytest.mark.parametrize(
    ("credentials", "length", "status"),
    [
        (f"Bearer {LONG_KEY}", 2_000_000_000, 413),
        ("Bearer wrong", 500_000, 403),
        ("Bearer wrong", 200_000, 403),  # a body of one read: the connection's own cycle
    ],
    ids=["declared too large", "wrong key", "wrong key, small body"],
)
def test_an_answer_given_before_the_body_arrived_ends_the_connection(
    server: RunningServer, credentials: str, length: int, status: int
) -> None:
    """Refused before its body was read, a request's connection says `connection: close` and
    closes within the linger time however long the client goes on sending (it stayed open as
    long as the client sent, or forever once it went idle)."""
    head = (
        f"POST {INFER} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {credentials}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    answer, flowed = answered_then_sending(server, head, seconds=15)
    response = parse_response(answer)
    assert response.status == status, answer[:200]
    assert response.headers.get("connection") == "close", response.headers
    assert flowed < 8, f"the server read the refused body for {flowed:.1f} s"
    assert infer(server).status_code == 200
