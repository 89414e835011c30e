"""Several workers behind one /metrics: the merged values survive a worker that crashes."""

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.scrape import scrape, send, total
from tests.serving import RunningServer, run_server, wait_for

# A request that declares a body it never finishes sending: it stays in flight.
HANGING = (
    b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: test\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
)


@pytest.fixture
def two_workers(trained_repository: Path, tmp_path: Path) -> Iterator[RunningServer]:
    with run_server(trained_repository, tmp_path, args=("--workers", "2")) as running:
        wait_for(lambda: len(_workers(running)) == 2, what="two workers")
        yield running


def _workers(server: RunningServer) -> set[int]:
    samples = scrape(server.url)
    return {int(dict(ls)["pid"]) for n, ls in samples if n == "process_cpu_seconds_total"}


def _sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed between listing and reading: not open now
            continue
    return count


def _closed(connection: socket.socket) -> bool:
    connection.settimeout(1.0)
    try:
        return connection.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _inflight(server: RunningServer) -> float:
    return total(scrape(server.url), "modelserve_inflight_requests")


def test_a_crashed_worker_leaves_its_counts_and_takes_its_live_gauges(
    two_workers: RunningServer,
) -> None:
    sent = send(two_workers.url, [("iris", "1", "v2", 3)] * 10, "crash")
    rows = total(scrape(two_workers.url), "modelserve_inference_rows_total")
    assert rows == sum(sent.rows.values()) == 30
    workers = sorted(_workers(two_workers))
    sockets = {pid: _sockets(pid) for pid in workers}
    host, port = two_workers.url.removeprefix("http://").split(":")
    with ExitStack() as stack:
        connections = []
        for _ in range(6):
            connection = stack.enter_context(socket.create_connection((host, int(port))))
            connection.sendall(HANGING)
            connections.append(connection)
        wait_for(lambda: _inflight(two_workers) == 6, what="6 requests in flight")
        # The worker holding most of them (by its open sockets) is killed without warning.
        holding = {pid: _sockets(pid) - sockets[pid] for pid in workers}
        victim = max(holding, key=lambda pid: holding[pid])
        assert holding[victim] >= 1
        os.kill(victim, signal.SIGKILL)
        # Its in-flight requests leave the sum; the other worker's stay. Which requests were
        # the victim's is read from the client side (the kernel closed exactly those), since
        # counting a worker's sockets also sees the test's own scrapes.
        wait_for(lambda: _inflight(two_workers) < 6, what="sweep")
        dropped = sum(_closed(c) for c in connections)
        assert dropped >= 1
        wait_for(lambda: _inflight(two_workers) == 6 - dropped, what="sweep of its requests only")
        wait_for(lambda: len(_workers(two_workers)) == 2, what="a replacement worker")
        assert victim not in _workers(two_workers)
        assert total(scrape(two_workers.url), "modelserve_inference_rows_total") == rows
    wait_for(lambda: _inflight(two_workers) == 0, what="no request in flight")
