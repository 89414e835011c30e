"""Memory under large JSON requests, measured on a real server process from /proc.

The bound: a worker's resident memory grows by at most MODELSERVE_MAX_DECODING_BYTES while it
serves requests at the body size limit, however many arrive at once; the requests over the
budget are refused with 503 and Retry-After, and succeed when retried.
"""

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest

from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.protocols.grpc import open_inference_grpc_pb2_grpc as pb_grpc
from service.server.allocator import TRIM_THRESHOLD_BYTES
from service.server.memory import EXPANSION
from tests.serving import RunningServer, run_server

LIMIT_BYTES = 2_000_000
CLIENTS = 8
PATH = "/v2/models/iris/versions/1/infer"
HEADERS = {"Content-Type": "application/json"}
# Room for two requests at the size limit at once.
BUDGET_BYTES = 2 * LIMIT_BYTES * EXPANSION


def body_at_the_limit() -> tuple[bytes, int]:
    """A V2 request for the iris model just under the body limit, and its row count."""
    rows = LIMIT_BYTES // 18
    while True:
        data = np.random.default_rng(0).uniform(0, 8, size=(rows, 4)).round(1)
        tensor = {"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": data.tolist()}
        body = orjson.dumps({"inputs": [tensor]})
        if len(body) <= LIMIT_BYTES:
            return body, rows
        rows -= rows // 50


def memory_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def run_clients(client: Callable[[], None]) -> None:
    """CLIENTS threads running `client` at once, until every one has finished."""
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.fixture(scope="module")
def memory_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    env = {
        "MODELSERVE_MAX_REQUEST_BYTES": str(LIMIT_BYTES),
        "MODELSERVE_MAX_DECODING_BYTES": str(BUDGET_BYTES),
        "MODELSERVE_ACCESS_LOG": "false",
    }
    with run_server(trained_repository, tmp_path_factory.mktemp("memory"), env=env) as running:
        yield running


def test_concurrent_requests_at_the_size_limit_stay_within_the_budget(
    memory_server: RunningServer,
) -> None:
    body, rows = body_at_the_limit()
    pid = memory_server.process.pid
    with httpx.Client(base_url=memory_server.url, timeout=60) as client:
        for _ in range(2):  # the first large request sizes the model's own buffers
            assert client.post(PATH, content=body, headers=HEADERS).status_code == 200
    time.sleep(0.5)
    baseline = memory_bytes(pid, "VmRSS")
    # Freed buffers go back to the system, except what each heap keeps at its top for the next
    # request (TRIM_THRESHOLD_BYTES; the event loop's heap and the model threads'), and what is
    # kept is reused: a second round keeps no more.
    for _ in range(2):
        growth, refusals = _round_at_the_limit(memory_server.url, body, rows, pid)
        assert refusals, "the budget never refused a request: it did not bound anything"
        assert all("MODELSERVE_MAX_DECODING_BYTES" in message for message in refusals)
        assert growth <= BUDGET_BYTES, f"grew by {growth / 1e6:.0f} MB"
        kept = memory_bytes(pid, "VmRSS") - baseline
        assert kept <= LIMIT_BYTES * 4 + 3 * TRIM_THRESHOLD_BYTES, f"kept {kept / 1e6:.1f} MB"


def _round_at_the_limit(url: str, body: bytes, rows: int, pid: int) -> tuple[int, list[str]]:
    """CLIENTS requests at the size limit at once, each retried until answered.

    Returns how far the worker's resident memory rose while they ran, and the refusals.
    """
    start_bytes = memory_bytes(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM restarts from VmRSS
    start = threading.Barrier(CLIENTS)
    answers: list[int] = []
    refusals: list[str] = []

    def client_thread() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            start.wait()
            while True:
                response = client.post(PATH, content=body, headers=HEADERS)
                if response.status_code != 503:
                    break
                refusals.append(response.json()["error"])
                time.sleep(float(response.headers["retry-after"]) / 10)
            assert response.status_code == 200, response.text
            outputs = {o["name"]: o for o in orjson.loads(response.content)["outputs"]}
            answers.append(outputs["label"]["shape"][0])

    run_clients(client_thread)
    assert answers == [rows] * CLIENTS
    return memory_bytes(pid, "VmHWM") - start_bytes, refusals


def test_grpc_calls_take_their_share_of_the_same_budget(memory_server: RunningServer) -> None:
    # gRPC receives a message whole before the service sees it, so the bound here is the
    # budget plus four copies of a message per client outside it: gRPC's buffer, the message's
    # bytes and its parsed form (of a call refused as well as one served), and gRPC's copy of an
    # answer being sent. Measured 57-87 MB; without a reservation nothing was ever refused.
    rows = LIMIT_BYTES // 20  # raw FP32 contents: 16 bytes a row, just under the limit
    data = np.random.default_rng(0).uniform(0, 8, size=(rows, 4)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="iris", model_version="1")
    request.inputs.add(name="input", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(data.tobytes())
    pid = memory_server.process.pid
    start = threading.Barrier(CLIENTS)
    answers: list[int] = []
    refusals: list[str] = []

    def client_thread() -> None:
        with grpc.insecure_channel(memory_server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            start.wait()
            while True:
                try:
                    answer = stub.ModelInfer(request, timeout=120)
                except grpc.RpcError as error:
                    refusals.append(f"{error.code().name}: {error.details()}")
                    time.sleep(0.1)
                    continue
                answers.append(answer.outputs[0].shape[0])
                return

    baseline = memory_bytes(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    run_clients(client_thread)
    growth = memory_bytes(pid, "VmHWM") - baseline
    assert answers == [rows] * CLIENTS
    assert refusals, "the budget never refused a call: gRPC went around it"
    assert all(
        m.startswith("UNAVAILABLE") and "MODELSERVE_MAX_DECODING_BYTES" in m for m in refusals
    ), refusals
    assert growth <= BUDGET_BYTES + 4 * CLIENTS * LIMIT_BYTES, f"grew by {growth / 1e6:.0f} MB"
