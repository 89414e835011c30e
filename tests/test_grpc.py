"""The gRPC service (Open Inference Protocol) with the real tritonclient.grpc, against real servers.

Answers are compared with the same requests over REST; errors with their status codes and
messages; after each bad request the server still answers.
"""

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sklearn.datasets import load_iris

from tests.conftest import API_KEY, FaultSetup, fault_env
from tests.grpcclient import tritonclient_grpc
from tests.scrape import access_lines, scrape, total
from tests.serving import RunningServer, free_port, memory, run_server, wait_for

triton = tritonclient_grpc()
pb = triton.service_pb2
IRIS = load_iris()
ROWS = IRIS.data[[0, 60, 120]].astype(np.float32)
EXPECTED = [str(IRIS.target_names[t]) for t in IRIS.target[[0, 60, 120]]]
KEY = "grpc-key"
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Any]:
    connection = triton.InferenceServerClient(server.grpc_target)
    yield connection
    connection.close()


def _input(rows: np.ndarray[Any, Any], name: str = "input", datatype: str = "FP32") -> Any:
    tensor = triton.InferInput(name, list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)
    return tensor


def _rest(server: RunningServer, version: str, rows: np.ndarray[Any, Any]) -> dict[str, Any]:
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }
    response = httpx.post(f"{server.url}/v2/models/iris/versions/{version}/infer", json=body)
    assert response.status_code == 200, response.text
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


def _stub(server: RunningServer) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(server.grpc_target)
    return channel, triton.service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _contents_request(rows: np.ndarray[Any, Any], version: str = "") -> Any:
    request = pb.ModelInferRequest(model_name="iris", model_version=version, id="typed-1")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
    tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
    return request


def test_health_and_readiness(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    assert client.is_model_ready("iris", "stable")
    assert not client.is_model_ready("iris", "7")
    assert not client.is_model_ready("no_such_model")


def test_metadata_matches_rest(client: Any, server: RunningServer) -> None:
    rest = httpx.get(f"{server.url}/v2/models/iris").json()
    metadata = client.get_model_metadata("iris", as_json=True)
    assert metadata["name"] == "iris"
    assert metadata["versions"] == rest["versions"]
    assert metadata["platform"] == rest["platform"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert [o["name"] for o in metadata["outputs"]] == [o["name"] for o in rest["outputs"]]
    assert client.get_model_metadata("iris", "1", as_json=True)["versions"] == ["1"]
    server_metadata = client.get_server_metadata(as_json=True)
    assert server_metadata["name"] == "modelserve"
    assert server_metadata["extensions"] == httpx.get(f"{server.url}/v2").json()["extensions"]


@pytest.mark.parametrize("version", ["1", "2", "stable", "production"])
def test_infer_raw_equals_rest(client: Any, server: RunningServer, version: str) -> None:
    result = client.infer("iris", [_input(ROWS)], model_version=version, request_id="raw-1")
    rest = _rest(server, version, ROWS)
    assert [v.decode() for v in result.as_numpy("label")] == EXPECTED == rest["label"]
    np.testing.assert_array_equal(
        result.as_numpy("probabilities"),
        np.asarray(rest["probabilities"], dtype=np.float32).reshape(-1, 3),
    )
    response = result.get_response()
    assert response.id == "raw-1"
    assert response.model_version == {"stable": "1", "production": "2"}.get(version, version)


@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_typed_contents_answers_typed(server: RunningServer, version: str) -> None:
    channel, stub = _stub(server)
    with channel:
        response = stub.ModelInfer(_contents_request(ROWS, version))
    rest = _rest(server, version, ROWS)
    assert not response.raw_output_contents
    outputs = {o.name: o for o in response.outputs}
    assert [v.decode() for v in outputs["label"].contents.bytes_contents] == rest["label"]
    np.testing.assert_array_equal(
        np.asarray(outputs["probabilities"].contents.fp32_contents, dtype=np.float32),
        np.asarray(rest["probabilities"], dtype=np.float32).reshape(-1),
    )
    assert list(outputs["probabilities"].shape) == [3, 3]
    assert response.id == "typed-1"


def test_outputs_selection(client: Any) -> None:
    result = client.infer(
        "iris", [_input(ROWS)], outputs=[triton.InferRequestedOutput("probabilities")]
    )
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    assert result.as_numpy("label") is None


def _bad_raw(request: Any) -> None:
    request.raw_input_contents.append(b"\0" * 12)  # shape [1, 4] of FP32 needs 16 bytes


def _typed_fp16(request: Any) -> None:
    request.inputs[0].datatype = "FP16"


def _classification(request: Any) -> None:
    output = request.outputs.add(name="label")
    output.parameters["classification"].int64_param = 2


def _mixed(request: Any) -> None:
    request.raw_input_contents.append(np.zeros(4, dtype="<f4").tobytes())


def _int8_out_of_range(request: Any) -> None:
    tensor = request.inputs[0]
    tensor.datatype = "INT8"
    tensor.contents.ClearField("fp32_contents")
    tensor.contents.int_contents.extend([1000, 1, 1, 1])  # int_contents are 32 bits wide


def _server_deadline(request: Any) -> None:
    request.parameters["timeout"].int64_param = 1  # microseconds, as tritonclient sends it


# What a request changes → the status code and a fragment of the message that names the cause.
BAD_REQUESTS: list[tuple[str, Callable[[Any], None], Any, str]] = [
    ("unknown model", lambda r: setattr(r, "model_name", "nope"), "NOT_FOUND", "'nope'"),
    ("unknown version", lambda r: setattr(r, "model_version", "9"), "NOT_FOUND", "9"),
    (
        "unknown alias",
        lambda r: setattr(r, "model_version", "canary"),
        "NOT_FOUND",
        "canary",
    ),
    (
        "three features",
        lambda r: r.inputs[0].shape.__setitem__(1, 3),
        "INVALID_ARGUMENT",
        "shape [1, 3] needs 3",
    ),
    ("unknown input", lambda r: setattr(r.inputs[0], "name", "x"), "INVALID_ARGUMENT", "'x'"),
    ("no inputs", lambda r: r.ClearField("inputs"), "INVALID_ARGUMENT", "'inputs'"),
    (
        "unknown output",
        lambda r: r.outputs.add(name="score"),
        "INVALID_ARGUMENT",
        "no output 'score'",
    ),
    ("FP16 as contents", _typed_fp16, "INVALID_ARGUMENT", "raw_input_contents"),
    ("contents and raw", _mixed, "INVALID_ARGUMENT", "one or the other"),
    ("classification", _classification, "INVALID_ARGUMENT", "classification"),
    (
        "NaN",
        lambda r: r.inputs[0].contents.fp32_contents.__setitem__(0, float("nan")),
        "INVALID_ARGUMENT",
        "NaN",
    ),
    ("server deadline", _server_deadline, "DEADLINE_EXCEEDED", "deadline passed"),
    ("INT8 out of range", _int8_out_of_range, "INVALID_ARGUMENT", "out of the range of INT8"),
    (
        "10^12 rows claimed",  # refused before the contents are looked at, as over REST
        lambda r: r.inputs[0].shape.__setitem__(0, 10**12),
        "RESOURCE_EXHAUSTED",
        "1000000000000 rows is more than the limit",
    ),
]


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests(
    server: RunningServer, change: Callable[[Any], None], code: str, message: str
) -> None:
    request = _contents_request(ROWS[:1])
    change(request)
    channel, stub = _stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as failure:
            stub.ModelInfer(request)
        error: Any = failure.value
        assert error.code() == getattr(grpc.StatusCode, code)
        assert message in error.details()
        # The server still answers.
        assert stub.ModelInfer(_contents_request(ROWS[:1])).outputs


def test_raw_size_mismatch_names_the_sizes(server: RunningServer) -> None:
    request = pb.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    _bad_raw(request)
    channel, stub = _stub(server)
    with channel, pytest.raises(grpc.RpcError) as failure:
        stub.ModelInfer(request)
    error: Any = failure.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds 12 bytes" in error.details()
    assert "needs 16" in error.details()


def test_errors_raise_client_exceptions(client: Any) -> None:
    with pytest.raises(triton.InferenceServerException, match="4 features") as failure:
        client.infer("iris", [_input(np.zeros((1, 3), dtype=np.float32))])
    assert failure.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(triton.InferenceServerException, match="not in the repository") as missing:
        client.infer("nope", [_input(ROWS)])
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_metrics_and_access_lines(client: Any, server: RunningServer) -> None:
    before = total(scrape(server.url), "modelserve_requests_total", protocol="grpc", code="200")
    client.infer("iris", [_input(ROWS)], model_version="1", headers={"x-request-id": "grpc-log-1"})
    after = total(scrape(server.url), "modelserve_requests_total", protocol="grpc", code="200")
    assert after == before + 1
    wait_for(lambda: "grpc-log-1" in server.output(), timeout=5)
    line = next(line for line in server.output().splitlines() if "grpc-log-1" in line)
    assert "path=/inference.GRPCInferenceService/ModelInfer" in line
    for field in ("protocol=grpc", "model=iris version=1", "rows=3"):
        assert field in line


def test_health_service_and_reflection(server: RunningServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' stub has no methods
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        listed = next(iter(reflection.ServerReflectionInfo(iter([request]))))
        names = {s.name for s in listed.list_services_response.service}
        # What grpcurl asks next to describe a service: the file that defines it.
        files = {}
        for symbol in ("inference.GRPCInferenceService", "grpc.health.v1.Health"):
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
            answer = next(iter(reflection.ServerReflectionInfo(iter([request]))))
            [proto] = answer.file_descriptor_response.file_descriptor_proto
            files[symbol] = descriptor_pb2.FileDescriptorProto.FromString(proto)
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert [s.name for s in files["inference.GRPCInferenceService"].service] == [
        "GRPCInferenceService"
    ]
    assert [s.name for s in files["grpc.health.v1.Health"].service] == ["Health"]


def test_the_protocols_messages_live_beside_a_clients_own() -> None:
    """KServe's client registers the same `inference.*` names in protobuf's default pool; ours
    are in a pool of their own, so one process imports both (it failed: duplicate symbol)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as theirs

    from service.protocols.grpc import open_inference_grpc_pb2 as ours

    sent = ours.ModelInferRequest(model_name="iris", raw_input_contents=[b"\x00" * 16])
    received = theirs.ModelInferRequest.FromString(sent.SerializeToString())
    assert (received.model_name, received.raw_input_contents) == ("iris", [b"\x00" * 16])


@pytest.fixture(scope="module")
def guarded_server(
    trained_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """API keys on, and a request limit a 10,000-row request is over."""
    env = {"MODELSERVE_API_KEYS": KEY, "MODELSERVE_MAX_REQUEST_BYTES": "65536"}
    with run_server(trained_repository, tmp_path_factory.mktemp("grpc-guarded"), env) as running:
        yield running


@pytest.mark.parametrize(
    ("headers", "code", "message"),
    [
        ({}, "UNAUTHENTICATED", "needs an API key"),
        ({"authorization": "Bearer wrong"}, "PERMISSION_DENIED", "not valid"),
        ({"x-api-key": "wrong"}, "PERMISSION_DENIED", "not valid"),
        ({"authorization": f"Bearer {KEY}"}, None, ""),
        ({"x-api-key": KEY}, None, ""),
    ],
)
def test_api_keys(
    guarded_server: RunningServer, headers: dict[str, str], code: str | None, message: str
) -> None:
    client = triton.InferenceServerClient(guarded_server.grpc_target)
    try:
        calls: list[Callable[[], Any]] = [
            lambda: client.infer("iris", [_input(ROWS)], headers=headers),
            lambda: client.get_model_metadata("iris", headers=headers),
        ]
        for call in calls:
            if code is None:
                assert call() is not None
                continue
            with pytest.raises(triton.InferenceServerException, match=message) as failure:
                call()
            assert failure.value.status() == f"StatusCode.{code}"
        assert client.is_server_live()  # health needs no key, as over REST
    finally:
        client.close()


def test_message_over_the_request_limit(guarded_server: RunningServer) -> None:
    rows = np.tile(ROWS, (3334, 1))[:10_000]
    client = triton.InferenceServerClient(guarded_server.grpc_target)
    try:
        with pytest.raises(triton.InferenceServerException) as failure:
            client.infer("iris", [_input(rows)], headers={"x-api-key": KEY})
        assert failure.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "65536" in failure.value.message()
        assert client.is_server_live()
    finally:
        client.close()


def test_two_workers_share_the_port(workers_server: RunningServer) -> None:
    assert workers_server.output().count("gRPC listening on") == 2
    for index in range(24):  # each a new connection, which the kernel gives to either worker
        client = triton.InferenceServerClient(workers_server.grpc_target)
        try:
            result = client.infer(
                "iris", [_input(ROWS)], headers={"x-request-id": f"two-workers-{index}"}
            )
            assert [v.decode() for v in result.as_numpy("label")] == EXPECTED
        finally:
            client.close()

    def answered_by() -> set[object]:
        lines = access_lines(workers_server.output())
        return {line["pid"] for line in lines if str(line["request_id"]).startswith("two-workers-")}

    wait_for(lambda: len(answered_by()) == 2, timeout=10, what="both workers answering gRPC")


def test_grpc_deadline_ends_the_call_on_the_server(fault_server: RunningServer) -> None:
    """The slow model takes 0.5 s; the client's 0.2 s gRPC deadline ends the call there too."""
    client = triton.InferenceServerClient(fault_server.grpc_target)
    try:
        with pytest.raises(triton.InferenceServerException) as failure:
            client.infer(
                "slow",
                [_input(ROWS)],
                client_timeout=0.2,
                headers={"x-api-key": API_KEY, "x-request-id": "grpc-deadline-1"},
            )
        assert failure.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()

    def logged() -> str:
        lines = fault_server.output().splitlines()
        return next((line for line in lines if "grpc-deadline-1" in line), "")

    wait_for(lambda: bool(logged()), timeout=5, what="the access line of the late call")
    assert "status=504" in logged()
    assert "error=DeadlineExceeded" in logged()


def test_sigterm_drains_grpc(fault_setup: FaultSetup, tmp_path: Path) -> None:
    env = fault_env(
        fault_setup, MODELSERVE_SHUTDOWN_DELAY_S="1.5", MODELSERVE_GRACEFUL_SHUTDOWN_S="10"
    )
    with (
        run_server(fault_setup.root, tmp_path, env=env) as server,
        ThreadPoolExecutor(max_workers=2) as pool,
    ):
        client = triton.InferenceServerClient(server.grpc_target)
        channel = grpc.insecure_channel(server.grpc_target)
        health: Any = health_pb2_grpc.HealthStub(channel)
        try:
            accepted = pool.submit(client.infer, "slow", [_input(ROWS)])
            wait_for(lambda: "slow" in httpx.get(f"{server.url}/metrics").text, what="in flight")
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: not client.is_server_ready(), timeout=1.0, what="not ready")
            with pytest.raises(triton.InferenceServerException, match="shutting down") as refused:
                client.infer("iris", [_input(ROWS)])
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert client.is_server_live()
            assert accepted.result(timeout=10).as_numpy("label").tolist() == [0, 1, 2]
        finally:
            channel.close()
            client.close()
        assert server.process.wait(timeout=15) == 0


def test_readme_example(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    section = README.split("## gRPC API", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    shown = code.rsplit("# ", 1)[1].strip()
    exec(code.replace("localhost:8001", server.grpc_target), {})
    assert capsys.readouterr().out.strip() == shown


def test_a_second_server_on_a_taken_grpc_port_refuses_to_start(
    server: RunningServer, trained_repository: Path
) -> None:
    """Workers share the gRPC port through SO_REUSEPORT; an unrelated server must not share it
    too (the kernel split the calls between the two servers)."""
    port = server.grpc_target.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "service", "serve", "--model-repository"]
    command += [str(trained_repository), "--port", str(free_port()), "--grpc-port", port]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 3, done.stderr
    assert f"the gRPC port {port} on 127.0.0.1 is in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def _seen(server: RunningServer, text: str) -> bool:
    return text in server.output()


def _logged(server: RunningServer, text: str) -> list[str]:
    return [line for line in server.output().splitlines() if text in line]


def test_a_corrupt_message_is_invalid_argument_and_the_server_carries_on(
    server: RunningServer, client: Any
) -> None:
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        for method in ("ModelInfer", "ModelMetadata"):
            raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/inference.GRPCInferenceService/{method}"
            )
            request_id = f"corrupt-{method}"
            with pytest.raises(grpc.RpcError) as failure:
                raw(b"\xff\xff\xff\xff\xff\x0a\x05ir", metadata=(("x-request-id", request_id),))
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"not a valid inference.{method}Request" in str(failure.value.details())
            wait_for(partial(_seen, server, request_id), 10, "its access line")
            line = _logged(server, request_id)[0]
            assert "status=400" in line, line
            assert "error=InvalidInput" in line, line
    finally:
        channel.close()
    assert "Traceback" not in server.output()
    assert list(client.infer("iris", [_input(ROWS)]).as_numpy("label")) == [
        label.encode() for label in EXPECTED
    ]


def _http2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
    return head + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header "without indexing", its name and value as plain strings (each under 127 bytes)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def _infer_head(*extra: tuple[str, str]) -> bytes:
    """The header block of a ModelInfer call, and `extra` fields."""
    fields = (
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/inference.GRPCInferenceService/ModelInfer"),
        ("content-type", "application/grpc"),
        *extra,
    )
    return b"".join(_hpack_literal(name, value) for name, value in fields)


def _stalled_call(target: str, message: Any) -> socket.socket:
    """A raw HTTP/2 connection that makes one call and never opens its window (it sends no
    WINDOW_UPDATE): the server can send it 64 kB of the answer, and holds the rest."""
    body = message.SerializeToString()
    framed = b"\x00" + len(body).to_bytes(4, "big") + body
    head = _infer_head((":authority", target), ("te", "trailers"))
    frames = [_http2_frame(1, 0x4, 1, head)]  # HEADERS, END_HEADERS
    for start in range(0, len(framed), 16384):
        end = 0x1 if start + 16384 >= len(framed) else 0  # END_STREAM on the last DATA
        frames.append(_http2_frame(0, end, 1, framed[start : start + 16384]))
    host, port = target.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    settings, ack = _http2_frame(4, 0, 0, b""), _http2_frame(4, 0x1, 0, b"")
    connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + ack + b"".join(frames))
    return connection


def _answers(client: Any, rows: np.ndarray[Any, Any]) -> bool:
    try:
        return client.infer("iris", [_input(rows)], model_version="2") is not None
    except triton.InferenceServerException:
        return False


def test_answers_a_client_does_not_read_stay_within_the_memory_budget(
    trained_repository: Path, tmp_path: Path
) -> None:
    """An answer the client does not read waits in the server: the call's share of
    MODELSERVE_MAX_DECODING_BYTES stays reserved until the call ends, so such clients meet the
    budget instead of growing the process (the share was returned once the answer was made)."""
    rows = np.tile(ROWS, (1334, 1))[:4000]  # 64 kB: within the server's first window
    message = pb.ModelInferRequest(model_name="iris", model_version="2")
    message.inputs.add(name="input", datatype="FP32", shape=[4000, 4])
    message.raw_input_contents.append(rows.tobytes())
    # The call reserves 9 x 64 kB of the budget; its answer is over the 64 kB window.
    env = {"MODELSERVE_MAX_DECODING_BYTES": "1000000"}
    with run_server(trained_repository, tmp_path, env) as running:
        client = triton.InferenceServerClient(running.grpc_target)
        try:
            for _ in range(5):  # an answered call's share returns: they run one after another
                assert _answers(client, rows)
            with _stalled_call(running.grpc_target, message):
                # Its line, after those of the five answered calls: its answer is made.
                stalled = partial(_logged, running, "rows=4000")
                wait_for(lambda: len(stalled()) > 5, 30, "the stalled call")
                with pytest.raises(triton.InferenceServerException) as refused:
                    client.infer("iris", [_input(rows)], model_version="2")
                assert "MODELSERVE_MAX_DECODING_BYTES" in refused.value.message()
            # The stalled client gone, its call ends and its share returns to the budget.
            wait_for(lambda: _answers(client, rows), 30, "an answer once the client left")
        finally:
            client.close()
        assert "Traceback" not in running.output()  # the client's leaving is no server error


def test_calls_without_a_message_are_answered_at_once(
    trained_repository: Path, tmp_path: Path
) -> None:
    """A unary call that ends without its request message is the client's error, answered at
    once: gRPC's own Python server answered nothing to such calls until their deadline or the
    client left, and 4,000 of them on one connection held 78 MB of a worker."""
    with run_server(trained_repository, tmp_path) as running:
        pid = running.process.pid
        client = triton.InferenceServerClient(running.grpc_target)
        try:
            assert _answers(client, ROWS)  # the service warmed up before the baseline
            baseline = memory(pid)
            with grpc.insecure_channel(running.grpc_target) as channel:
                # A unary method called as a client stream that sends no message.
                empty = channel.stream_unary(
                    "/inference.GRPCInferenceService/ModelInfer",
                    request_serializer=bytes,
                    response_deserializer=bytes,
                )
                calls = [empty.future(iter(())) for _ in range(4000)]
                failures: list[Any] = [call.exception(timeout=30) for call in calls]
                codes = Counter(failure.code() for failure in failures)
                details = failures[0].details()
            assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 4000}, codes
            assert "one request message; this one carried 0" in details, details
            held = memory(pid) - baseline
            assert held < 10_000_000, f"{held / 1e6:.0f} MB held"
            assert _answers(client, ROWS)
        finally:
            client.close()


def _frames_until_closed(
    connection: socket.socket, seconds: float, marker: bytes | None = None
) -> bytes:
    """What the server sends on a raw connection until it closes it, or sends `marker` (or
    `seconds` pass)."""
    connection.settimeout(seconds)
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while chunk := connection.recv(65536):
            received += chunk
            if marker is not None and marker in received:
                break
    return received


def test_a_message_that_stops_coming_is_answered_and_its_share_returned(
    trained_repository: Path, tmp_path: Path
) -> None:
    """A call whose message stops half way holds its share of the memory budget; it is answered
    DEADLINE_EXCEEDED once none of it has come for MODELSERVE_BODY_IDLE_TIMEOUT_S, as an HTTP
    body that stops is answered 408, and its share returns. A connection that never starts
    HTTP/2 is closed after MODELSERVE_HEADER_TIMEOUT_S, as an HTTP one that sends no head."""
    rows = np.tile(ROWS, (1334, 1))[:4000]  # reserves 9 x 64 kB of the budget
    env = {
        "MODELSERVE_MAX_DECODING_BYTES": "1000000",
        "MODELSERVE_BODY_IDLE_TIMEOUT_S": "3",
        "MODELSERVE_HEADER_TIMEOUT_S": "2",
    }
    head = _infer_head(("x-request-id", "stopped-1"))
    # The prefix of a 60,000-byte message, and 100 bytes of it.
    partial_message = b"\x00" + (60_000).to_bytes(4, "big") + b"\x0a" * 100
    with run_server(trained_repository, tmp_path, env) as running:
        client = triton.InferenceServerClient(running.grpc_target)
        host, port = running.grpc_target.rsplit(":", 1)
        try:
            assert _answers(client, rows)
            with (
                socket.create_connection((host, int(port)), timeout=10) as silent,
                socket.create_connection((host, int(port)), timeout=10) as stalled,
            ):
                settings = _http2_frame(4, 0, 0, b"")
                stalled.sendall(
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                    + settings
                    + _http2_frame(1, 0x4, 1, head)
                    + _http2_frame(0, 0, 1, partial_message)
                    + _http2_frame(6, 0, 0, b"stalled!")  # PING
                )
                # The server handles a connection's frames in order: the PING's answer says
                # it has read the message's prefix (and reserved for it).
                ack = _http2_frame(6, 0x1, 0, b"stalled!")
                assert ack in _frames_until_closed(stalled, 10, ack)
                with pytest.raises(triton.InferenceServerException) as refused:
                    client.infer("iris", [_input(rows)], model_version="2")
                assert "MODELSERVE_MAX_DECODING_BYTES" in refused.value.message()
                answer = _frames_until_closed(stalled, 10, b"IDLE_TIMEOUT_S")
                assert b"grpc-status\x014" in answer  # DEADLINE_EXCEEDED, in the trailers
                assert b"MODELSERVE_BODY_IDLE_TIMEOUT_S" in answer
                assert _answers(client, rows)  # its share returned
                # The silent connection was closed (recv saw its end, not the timeout).
                started = time.monotonic()
                assert _frames_until_closed(silent, 10).startswith(b"\x00")  # our SETTINGS
                assert time.monotonic() - started < 9
        finally:
            client.close()
        wait_for(partial(_seen, running, "stopped-1"), 10, "the stopped call's access line")
        line = _logged(running, "stopped-1")[0]
        assert "status=408" in line, line
        assert "Traceback" not in running.output()


@pytest.mark.parametrize("continued", [True, False], ids=["continuation", "one-frame"])
def test_a_header_block_past_the_limit_closes_the_connection(
    server: RunningServer, client: Any, continued: bool
) -> None:
    """HTTP/2 sends a header block in CONTINUATION frames, as many as the client likes, or in
    one HEADERS frame of up to the frame limit: past MODELSERVE_MAX_HEADER_BYTES the connection
    ends (GOAWAY), as an HTTP head that long ends with 431, and nothing of it is kept."""
    host, port = server.grpc_target.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)), timeout=10)
    value = "v" * 100
    block = b"".join(_hpack_literal(f"x-filler-{i}", value) for i in range(8))
    if continued:
        frames = [_http2_frame(1, 0, 1, _hpack_literal(":method", "POST"))]  # no END_HEADERS
        frames += [_http2_frame(9, 0, 1, block) for _ in range(200)]  # 176 kB of CONTINUATION
    else:
        frames = [_http2_frame(1, 0x4, 1, block * 100)]  # 88 kB in one HEADERS frame
    connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _http2_frame(4, 0, 0, b""))
    with contextlib.suppress(OSError):  # the server may close before it has read everything
        connection.sendall(b"".join(frames))
    received = _frames_until_closed(connection, 10)
    connection.close()
    goaway = received.find(b"\x07\x00\x00\x00\x00\x00")  # a GOAWAY frame on stream 0
    assert goaway > 0, received
    assert received[goaway + 10 : goaway + 14] == (0xB).to_bytes(4, "big")  # ENHANCE_YOUR_CALM
    assert list(client.infer("iris", [_input(ROWS)]).as_numpy("label")) == [
        label.encode() for label in EXPECTED
    ]


def _one_call(server: RunningServer, head: bytes, data: bytes) -> bytes:
    """A call on a raw connection: its header block and one DATA frame; what came back."""
    host, port = server.grpc_target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _http2_frame(4, 0, 0, b"")
            + _http2_frame(1, 0x4, 1, head)
            + _http2_frame(0, 0x1, 1, data)
        )
        return _frames_until_closed(connection, 10, b"grpc-status")


def test_messages_a_call_may_not_carry_are_refused_and_hold_nothing(
    server: RunningServer, client: Any
) -> None:
    """A message that does not inflate, followed in the same frame by the prefix of a 250 MB
    one (which would take the whole memory budget, for good, were it reserved for a call
    already answered); a thousand empty messages in one unary call."""
    head = _infer_head(("grpc-encoding", "gzip"))
    garbage = (
        b"\x01" + (4).to_bytes(4, "big") + b"xxxx" + b"\x00" + (250_000_000).to_bytes(4, "big")
    )
    answer = _one_call(server, head, garbage)
    assert b"grpc-status\x0213" in answer  # INTERNAL: the message does not inflate
    assert b"does not inflate" in answer
    expected = [label.encode() for label in EXPECTED]
    # The budget is whole: nothing was kept for the refused call.
    assert list(client.infer("iris", [_input(ROWS)]).as_numpy("label")) == expected
    answer = _one_call(server, _infer_head(), b"\x00\x00\x00\x00\x00" * 1000)
    assert b"grpc-status\x013" in answer  # INVALID_ARGUMENT
    assert b"this one carried more" in answer
    assert list(client.infer("iris", [_input(ROWS)]).as_numpy("label")) == expected


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_messages_are_read(client: Any, algorithm: str) -> None:
    result = client.infer("iris", [_input(ROWS)], compression_algorithm=algorithm)
    assert [v.decode() for v in result.as_numpy("label")] == EXPECTED


def test_a_trickled_message_and_an_unread_answer_are_ended(
    trained_repository: Path, tmp_path: Path
) -> None:
    """A message sent a byte at a time is answered DEADLINE_EXCEEDED once
    MODELSERVE_REQUEST_TIMEOUT_S has passed since the call opened, as a trickled HTTP body is;
    an answer its client reads none of for MODELSERVE_BODY_IDLE_TIMEOUT_S is reset (CANCEL)
    and its share of the memory budget returns, the connection still open."""
    rows = np.tile(ROWS, (1334, 1))[:4000]
    message = pb.ModelInferRequest(model_name="iris", model_version="2")
    message.inputs.add(name="input", datatype="FP32", shape=[4000, 4])
    message.raw_input_contents.append(rows.tobytes())
    env = {
        "MODELSERVE_MAX_DECODING_BYTES": "1000000",
        "MODELSERVE_REQUEST_TIMEOUT_S": "2",
        "MODELSERVE_BODY_IDLE_TIMEOUT_S": "3",
    }
    with run_server(trained_repository, tmp_path, env) as running:
        client = triton.InferenceServerClient(running.grpc_target)
        host, port = running.grpc_target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=10) as trickle:
                head = _infer_head(("x-request-id", "trickled-1"))
                trickle.sendall(
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                    + _http2_frame(4, 0, 0, b"")
                    + _http2_frame(1, 0x4, 1, head)
                )
                started = time.monotonic()
                for byte in b"\x00\x00\x00\x01\x00" + b"\x0a" * 20:  # a 65,536-byte message
                    trickle.sendall(_http2_frame(0, 0, 1, bytes([byte])))
                    time.sleep(0.25)
                    if time.monotonic() - started > 4:
                        break
                answer = _frames_until_closed(trickle, 10, b"TIMEOUT_S)")
                assert b"grpc-status\x014" in answer
                assert b"MODELSERVE_REQUEST_TIMEOUT_S" in answer
            with _stalled_call(running.grpc_target, message) as stalled:
                stalled_lines = partial(_logged, running, "reset: its client read none")
                wait_for(lambda: bool(stalled_lines()), 15, "the unread answer's reset")
                reset = _http2_frame(3, 0, 1, (0x8).to_bytes(4, "big"))  # RST_STREAM CANCEL
                assert reset in _frames_until_closed(stalled, 10, reset)
                assert _answers(client, rows)  # its share returned, its connection open
        finally:
            client.close()
        assert "Traceback" not in running.output()


def _parsed_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """The whole frames in `data` (after none of a preface): kind, flags, stream, payload."""
    frames, at = [], 0
    while len(data) - at >= 9:
        size = int.from_bytes(data[at : at + 3], "big")
        if len(data) - at - 9 < size:
            break
        stream = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        frames.append((data[at + 3], data[at + 4], stream, data[at + 9 : at + 9 + size]))
        at += 9 + size
    return frames


def _address(server: RunningServer) -> tuple[str, int]:
    host, port = server.grpc_target.rsplit(":", 1)
    return host, int(port)


def _ping(connection: socket.socket, marker: bytes) -> bytes:
    """Send a PING and read until its ACK: the server handles a connection's frames in order,
    so what it sent in answer to the frames before the PING has come by then."""
    connection.sendall(_http2_frame(6, 0, 0, marker))
    return _frames_until_closed(connection, 30, _http2_frame(6, 0x1, 0, marker))


def test_calls_cancelled_past_the_limit_end_the_connection(
    server: RunningServer, client: Any
) -> None:
    """A client may cancel (RST_STREAM) calls in progress, a burst of 1,000 and then 100 a
    second; a client that keeps opening and cancelling calls, which never has many open and
    so is not held by the limit of calls in flight ("rapid reset"), has its connection ended
    with GOAWAY ENHANCE_YOUR_CALM, logged, and other clients are served."""
    head = _infer_head((":authority", server.grpc_target), ("te", "trailers"))
    cancel = (0x8).to_bytes(4, "big")

    def opened_and_cancelled(first: int, count: int) -> bytes:
        ids = range(first, first + 2 * count, 2)
        return b"".join(_http2_frame(1, 0x4, i, head) + _http2_frame(3, 0, i, cancel) for i in ids)

    with socket.create_connection(_address(server), timeout=10) as connection:
        connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _http2_frame(4, 0, 0, b""))
        connection.sendall(opened_and_cancelled(1, 500))
        received = _ping(connection, b"fivehun!")
        assert all(kind != 7 for kind, *_ in _parsed_frames(received))  # no GOAWAY yet
        with contextlib.suppress(OSError):  # the server may close before it has read all
            connection.sendall(opened_and_cancelled(1001, 2000))
        received = _frames_until_closed(connection, 10, b"faster")
    goaways = [payload for kind, _, _, payload in _parsed_frames(received) if kind == 7]
    assert goaways, received[:200]
    assert goaways[0][4:8] == (0xB).to_bytes(4, "big")  # ENHANCE_YOUR_CALM
    wait_for(lambda: bool(_logged(server, "cancelled faster than 100 a second")), 10, "its log")
    assert list(client.infer("iris", [_input(ROWS)]).as_numpy("label")) == [
        label.encode() for label in EXPECTED
    ]


def test_answers_waiting_for_window_move_when_it_opens(
    trained_repository: Path, tmp_path: Path
) -> None:
    """Flow control both ways of waiting: 1,000 answers held by their streams' windows (the
    client's SETTINGS_INITIAL_WINDOW_SIZE is 0) are not visited by the client's connection
    WINDOW_UPDATEs (each cost a pass over all of them: 20,000 such frames took 8 s of the
    server's CPU), one stream's WINDOW_UPDATE moves that stream's answer alone, and every
    answer comes whole once the windows open."""
    message = pb.ModelInferRequest(model_name="iris", model_version="2")
    message.inputs.add(name="input", datatype="FP32", shape=[3, 4])
    message.raw_input_contents.append(ROWS.tobytes())
    body = message.SerializeToString()
    framed = b"\x00" + len(body).to_bytes(4, "big") + body
    ids = range(1, 2001, 2)
    head = _infer_head(("te", "trailers"))
    calls = b"".join(_http2_frame(1, 0x4, i, head) + _http2_frame(0, 0x1, i, framed) for i in ids)
    no_window = (4).to_bytes(2, "big") + (0).to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
    env = {"MODELSERVE_MAX_QUEUE_REQUESTS": "1000"}  # all 1,000 calls wait for the model
    with (
        run_server(trained_repository, tmp_path, env) as server,
        socket.create_connection(_address(server), timeout=30) as connection,
    ):
        connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _http2_frame(4, 0, 0, no_window))
        connection.sendall(calls)
        answered = b"grpc-status\x010"  # OK
        received = b""
        # Every answer made, and held: its headers sent, none of its message.
        while {s for kind, _, s, _ in _parsed_frames(received) if kind == 1} != set(ids):
            received += connection.recv(1 << 20)
        assert all(kind != 0 for kind, *_ in _parsed_frames(received))
        started = time.monotonic()
        connection.sendall(_http2_frame(8, 0, 0, (1).to_bytes(4, "big")) * 20_000)
        received += _ping(connection, b"updates!")
        assert time.monotonic() - started < 3
        assert all(kind != 0 for kind, *_ in _parsed_frames(received))
        open_window = (1 << 20).to_bytes(4, "big")
        connection.sendall(_http2_frame(8, 0, 3, open_window))  # stream 3's window alone
        received += _ping(connection, b"stream3!")
        frames = _parsed_frames(received)
        assert {stream for kind, _, stream, _ in frames if kind == 0} == {3}
        assert any(kind == 1 and stream == 3 and answered in p for kind, _, stream, p in frames)
        opened = (4).to_bytes(2, "big") + (1 << 20).to_bytes(4, "big")
        connection.sendall(_http2_frame(4, 0, 0, opened) + _http2_frame(8, 0, 0, open_window))
        received += _ping(connection, b"opened!!")

        def finished() -> set[int]:
            frames = _parsed_frames(received)
            return {
                s for kind, flags, s, p in frames if kind == 1 and flags & 0x1 and answered in p
            }

        # (Answers held by a full socket buffer come after the PING's answer.)
        connection.settimeout(10)
        while finished() != set(ids) and (chunk := connection.recv(1 << 20)):
            received += chunk
    assert finished() == set(ids)
    frames = _parsed_frames(received)
    data = {s: b"" for s in ids}
    for kind, _, stream, payload in frames:
        if kind == 0:
            data[stream] += payload
    answers = {pb.ModelInferResponse.FromString(d[5:]).id for d in data.values()}
    assert len(answers) == 1
    assert all(int.from_bytes(d[1:5], "big") == len(d) - 5 for d in data.values())


def test_a_settings_frame_costs_one_pass_over_the_calls(server: RunningServer, client: Any) -> None:
    """SETTINGS_INITIAL_WINDOW_SIZE moves the window of every call in progress: a frame that
    sets it 170,000 times over 1,000 open calls is applied once (applied per entry, such a
    1 MiB frame cost the server seconds of CPU)."""
    head = _infer_head(("te", "trailers"))
    ids = range(1, 2001, 2)
    entries = b"".join(
        (4).to_bytes(2, "big") + (window).to_bytes(4, "big") for window in (1000, 2000)
    )
    flood = _http2_frame(4, 0, 0, entries * 87_000)  # under the server's 1 MiB frame limit
    with socket.create_connection(_address(server), timeout=30) as connection:
        connection.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _http2_frame(4, 0, 0, b""))
        connection.sendall(b"".join(_http2_frame(1, 0x4, i, head) for i in ids))  # no messages
        _ping(connection, b"opened!!")
        started = time.monotonic()
        connection.sendall(flood)
        received = _ping(connection, b"settled!")
        assert time.monotonic() - started < 2
        assert _http2_frame(4, 0x1, 0, b"") in received  # its ACK
        assert all(kind != 7 for kind, *_ in _parsed_frames(received))  # no GOAWAY
    assert [v.decode() for v in client.infer("iris", [_input(ROWS)]).as_numpy("label")] == EXPECTED


@pytest.mark.parametrize(
    ("frames", "goaway"),
    [
        ([_http2_frame(8, 0, 0, (0).to_bytes(4, "big"))], 0x1),  # connection WINDOW_UPDATE 0
        ([_http2_frame(3, 0, 7, (8).to_bytes(4, "big"))], 0x1),  # RST_STREAM on an idle stream
        ([_http2_frame(3, 0, 0, (8).to_bytes(4, "big"))], 0x1),  # RST_STREAM on stream 0
        ([_http2_frame(1, 0x4, 1, _infer_head()), _http2_frame(3, 0, 1, b"\x00\x08")], 0x6),
        ([_http2_frame(8, 0, 0, (2**31 - 1).to_bytes(4, "big"))], 0x3),  # connection window
        ([_http2_frame(4, 0, 0, (4).to_bytes(2, "big") + (2**31).to_bytes(4, "big"))], 0x3),
    ],
    ids=["window-update-0", "reset-idle", "reset-0", "reset-short", "window-over", "settings"],
)
def test_flow_control_and_reset_errors_end_the_connection(
    server: RunningServer, client: Any, frames: list[bytes], goaway: int
) -> None:
    """RFC 9113's connection errors around flow control and RST_STREAM: GOAWAY with the code
    the RFC names (PROTOCOL_ERROR, FRAME_SIZE_ERROR, FLOW_CONTROL_ERROR); others are served."""
    with socket.create_connection(_address(server), timeout=10) as connection:
        connection.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _http2_frame(4, 0, 0, b"") + b"".join(frames)
        )
        received = _frames_until_closed(connection, 10)
    goaways = [payload for kind, _, _, payload in _parsed_frames(received) if kind == 7]
    assert goaways, received[:200]
    assert goaways[0][4:8] == goaway.to_bytes(4, "big")
    assert [v.decode() for v in client.infer("iris", [_input(ROWS)]).as_numpy("label")] == EXPECTED


@pytest.mark.parametrize(
    ("increment", "code"), [(0, 0x1), (2**31 - 1, 0x3)], ids=["zero", "past-the-limit"]
)
def test_a_bad_stream_window_update_resets_that_call_only(
    server: RunningServer, increment: int, code: int
) -> None:
    """A stream's WINDOW_UPDATE of 0 (PROTOCOL_ERROR) or one that takes its window past
    2^31 - 1 (FLOW_CONTROL_ERROR) is a stream error: that call is reset, the connection kept."""
    with socket.create_connection(_address(server), timeout=10) as connection:
        connection.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _http2_frame(4, 0, 0, b"")
            + _http2_frame(1, 0x4, 1, _infer_head())  # a call waiting for its message
            + _http2_frame(8, 0, 1, increment.to_bytes(4, "big"))
        )
        received = _ping(connection, b"stillup!")
    frames = _parsed_frames(received)
    assert (3, 0, 1, code.to_bytes(4, "big")) in frames
    assert all(kind != 7 for kind, *_ in frames)


def test_a_large_answer_comes_in_frames_of_the_clients_size(server: RunningServer) -> None:
    """A client that leaves SETTINGS_MAX_FRAME_SIZE at HTTP/2's 16,384 (as nghttp2 does), its
    windows open: a 4,000-row answer comes as full frames of that size and a last shorter one,
    and they join into the answer grpcio's client gets for the same call."""
    rows = np.tile(ROWS, (1334, 1))[:4000]
    message = pb.ModelInferRequest(model_name="iris", model_version="2", id="framed")
    message.inputs.add(name="input", datatype="FP32", shape=[4000, 4])
    message.raw_input_contents.append(rows.tobytes())
    body = message.SerializeToString()
    framed = b"\x00" + len(body).to_bytes(4, "big") + body
    window = (4).to_bytes(2, "big") + (2**30).to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
    data = [
        _http2_frame(0, 0x1 if at + 16384 >= len(framed) else 0, 1, framed[at : at + 16384])
        for at in range(0, len(framed), 16384)
    ]
    with socket.create_connection(_address(server), timeout=10) as connection:
        connection.sendall(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + _http2_frame(4, 0, 0, window)
            + _http2_frame(8, 0, 0, (2**30).to_bytes(4, "big"))  # the connection's window
            + _http2_frame(1, 0x4, 1, _infer_head(("te", "trailers")))
            + b"".join(data)
        )
        received = _frames_until_closed(connection, 10, b"grpc-status\x010")
    sizes = [len(payload) for kind, _, _, payload in _parsed_frames(received) if kind == 0]
    assert len(sizes) > 2
    assert all(size == 16384 for size in sizes[:-1])
    assert 0 < sizes[-1] <= 16384
    answer = b"".join(p for kind, _, _, p in _parsed_frames(received) if kind == 0)
    assert int.from_bytes(answer[1:5], "big") == len(answer) - 5
    channel, stub = _stub(server)
    with channel:
        expected = stub.ModelInfer(message)
    assert type(expected).FromString(answer[5:]) == expected
    assert len(expected.raw_output_contents) == 2  # raw contents in, raw contents out
