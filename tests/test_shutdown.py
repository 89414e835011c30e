"""Process faults on real servers: SIGTERM with requests in flight, a killed worker."""

import concurrent.futures
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import FaultSetup, fault_env
from tests.serving import RunningServer, run_server
from tests.test_faults import EXPECTED, INFER, JSON, assert_serving, infer_body


@pytest.fixture(autouse=True)
def still_serving(fault_client: httpx.Client) -> Iterator[None]:
    yield
    assert_serving(fault_client)


def inflight(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("modelserve_inflight_requests "):
            return float(line.split()[1])
    raise AssertionError("no modelserve_inflight_requests in /metrics")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_finishes_accepted_requests_and_exits_0(
    fault_setup: FaultSetup, tmp_path: Path
) -> None:
    env = fault_env(
        fault_setup, MODELSERVE_SHUTDOWN_DELAY_S="1.5", MODELSERVE_GRACEFUL_SHUTDOWN_S="10"
    )
    with (
        run_server(fault_setup.root, tmp_path, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30.0) as http,
        concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool,
    ):
        accepted = [
            pool.submit(http.post, "/v2/models/slow/infer", content=infer_body(), headers=JSON)
            for _ in range(4)
        ]
        wait_for(lambda: inflight(http) == 4, 10, "4 requests in flight")
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        wait_for(lambda: http.get("/v2/health/ready").status_code == 503, 1.0, "not ready")
        refused = http.post(INFER, content=infer_body(), headers=JSON)
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]
        assert refused.headers["retry-after"].isdigit()
        assert http.get("/v2/health/live").status_code == 200
        for future in accepted:
            response = future.result()
            assert response.status_code == 200, response.text
            labels = {o["name"]: o["data"] for o in response.json()["outputs"]}["label"]
            assert labels == [0, 1, 2]
        assert server.process.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 10
    # After the drain delay the listener is closed: nothing new is accepted.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/v2/health/live", timeout=2.0)


def worker_pids(server: RunningServer) -> set[int]:
    """The uvicorn worker processes: the parent's children started by multiprocessing."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    pids = set()
    for pid in children.read_text().split():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue  # exited between the two reads
        if b"spawn_main" in command:
            pids.add(int(pid))
    return pids


def startups(server: RunningServer) -> int:
    return server.output().count("Application startup complete")


def started_at_least(server: RunningServer, count: int) -> Callable[[], bool]:
    return lambda: startups(server) >= count


def test_killed_worker_is_replaced_while_the_other_serves(
    fault_setup: FaultSetup, tmp_path: Path
) -> None:
    env = fault_env(fault_setup)
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with (
        run_server(fault_setup.root, tmp_path, env=env, args=("--workers", "2")) as server,
        httpx.Client(base_url=server.url, timeout=30.0, limits=no_reuse) as http,
    ):
        wait_for(lambda: len(worker_pids(server)) == 2 and startups(server) == 2, 60, "2 workers")
        first, second = sorted(worker_pids(server))
        # Without MODELSERVE_ADMIN_TOKEN the repository endpoints are switched off: 403.
        assert http.post("/v2/repository/index").status_code == 403
        for victim in (first, second):
            started = startups(server) + 1
            os.kill(victim, signal.SIGKILL)
            # The other worker answers every new connection meanwhile.
            for _ in range(20):
                response = http.post(INFER, content=infer_body(), headers=JSON)
                assert response.status_code == 200
                labels = {o["name"]: o["data"] for o in response.json()["outputs"]}["label"]
                assert labels == EXPECTED
            wait_for(started_at_least(server, started), 60, "a replacement worker")
            pids = worker_pids(server)
            assert victim not in pids
            assert len(pids) == 2
        # Both original workers are gone: the replacements serve.
        assert not {first, second} & worker_pids(server)
        assert http.post(INFER, content=infer_body(), headers=JSON).status_code == 200
