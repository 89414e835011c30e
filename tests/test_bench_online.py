"""The online benchmark's own parts: raw-call measurement, bodies, servers and the report."""

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.online.__main__ import start_servers
from bench.online.h2load import OK, grpc_outcomes, parse_summary, run_h2load
from bench.online.messages import Contents, call, decode_response, frame, infer_request
from bench.online.monitoring import requests_for, shadowed_copy, shadowed_requests, summarise
from bench.online.raw import load_runtime, measure_raw
from bench.online.report import write_report
from bench.online.results import OURS_UNBATCHED
from bench.online.servers import Server, start_modelserve, wait_for_model
from bench.online.workload import Artifact, Encoding, build_request, decode_answer, features
from service.protocols.grpc import open_inference_grpc_pb2 as pb
from service.store.runtimes import RuntimeOptions
from tests.serving import RunningServer

# The benchmark's gRPC load generator (Debian: nghttp2-client); bench/run.sh installs it.
# scripts/chromium.sh installs it for the suite: under CI a missing h2load fails, never skips.
needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None and not os.environ.get("CI"), reason="h2load not installed"
)


@pytest.mark.parametrize("version", [1, 2])
def test_raw_call_measurement_gives_rows_per_second(iris_repository: Path, version: int) -> None:
    rates = measure_raw(iris_repository, Artifact("iris", version), 10, RuntimeOptions(), 0.02)
    expected = {"runtime", "estimator"} if version == 1 else {"runtime", "session"}
    assert set(rates) == expected
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())


@pytest.mark.parametrize("encoding", ["json", "binary"])
def test_benchmark_requests_are_answered_correctly(
    client: httpx.Client, trained_repository: Path, encoding: Encoding
) -> None:
    artifact = Artifact("iris", 1)
    rows = features("iris", 150)
    expected = (
        load_runtime(trained_repository, artifact, RuntimeOptions())
        .predict({"input": rows})
        .outputs
    )
    labels = [str(v) for v in expected["label"]]
    request = build_request("modelserve", artifact, rows, labels[0], encoding)
    headers = {"content-type": request.content_type}
    if request.header_length is not None:
        headers["inference-header-content-length"] = str(request.header_length)
    response = client.post(request.path, content=request.body, headers=headers)
    assert response.status_code == 200, response.text
    assert all(marker.encode() in response.content for marker in request.markers)
    answer = decode_answer(
        "modelserve", response.content, response.headers.get("inference-header-content-length"), 3
    )
    assert answer.labels == labels
    np.testing.assert_allclose(answer.probabilities, expected["probabilities"], atol=1e-6)


def _single(server: str, artifact: str, c: int, rate: float) -> dict[str, object]:
    return {
        "kind": "single",
        "rep": 0,
        "artifact": artifact,
        "server": server,
        "concurrency": c,
        "rate": rate,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "cpu_us": 1e6 / rate,
    }


def _bulk(server: str, encoding: str, rows_per_s: float) -> dict[str, object]:
    return {
        "kind": "bulk",
        "rep": 0,
        "artifact": "iris v2 (onnx)",
        "server": server,
        "rows": 10_000,
        "encoding": encoding,
        "rows_per_s": rows_per_s,
        "p50_ms": 5.0,
    }


def test_report_sets_triton_beside_modelserve(tmp_path: Path) -> None:
    records = [
        *(_single("modelserve", "iris v2 (onnx)", c, 6_000.0) for c in (1, 16, 64)),
        *(_single("Triton", "iris v2 (onnx)", c, 2_400.0) for c in (1, 16, 64)),
        _single("modelserve", "iris v1 (joblib)", 64, 4_800.0),
        _bulk("modelserve", "binary", 3e6),
        _bulk("Triton", "binary", 5e5),
        _bulk("Triton", "json", 3e5),
    ]
    write_report(records, tmp_path, repeat=1, minutes=1.0)
    report = (tmp_path / "online.md").read_text().splitlines()
    assert "| iris ONNX, 1 row, c=64: \N{MULTIPLICATION SIGN} Triton | 2.50 | >= 3 | **no** |" in (
        report
    )
    single = [line for line in report if line.startswith("| iris v2 (onnx) | Triton |")]
    assert [line.split(" | ")[2] for line in single] == ["1", "16", "64"]
    # modelserve's rows against Triton at the same concurrency; joblib through its ONNX version.
    assert "| iris v2 (onnx) | modelserve | 64 | 6,000 |" in "\n".join(report)
    assert any(
        line.startswith("| iris v1 (joblib) | modelserve | 64 |") and line.endswith("| 2.00 |")
        for line in report
    )
    bulk = [line for line in report if "| Triton | " in line and "10,000" in line]
    assert {line.split(" | ")[3] for line in bulk} == {"json", "binary"}
    assert any(
        line.startswith("| iris v2 (onnx) | 10,000 | modelserve | binary |")
        and line.endswith("| 6.00 |")
        for line in report
    )
    assert (tmp_path / "online.png").stat().st_size > 0


def test_only_names_servers_of_the_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--only \['Triton'\]: not among.*'modelserve'"):
        start_servers(tmp_path, tmp_path, tmp_path, peers=False, only=["Triton"])


@pytest.mark.e2e
def test_a_server_whose_model_never_loads_is_stopped(iris_repository: Path, tmp_path: Path) -> None:
    server = start_modelserve("modelserve", iris_repository, tmp_path, cores="0,1")
    try:
        with pytest.raises(TimeoutError, match=r"/v2/models/absent/ready not ready; see .*\.log"):
            wait_for_model(server, "/v2/models/absent/ready", timeout=0.5)
        assert server.process.poll() is not None
    finally:
        server.stop()


@pytest.mark.e2e
def test_the_shadow_configuration_mirrors_what_the_benchmark_sends(
    iris_repository: Path, tmp_path: Path
) -> None:
    server = start_modelserve(
        "shadow", shadowed_copy(iris_repository, tmp_path), tmp_path, cores="0,1"
    )
    try:
        assert shadowed_requests(server) == 0
        single, _ = requests_for(iris_repository)
        for _ in range(5):
            answer = httpx.post(
                server.url + single.path,
                content=single.body,
                headers={"content-type": single.content_type},
            )
            assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 5
        while shadowed_requests(server) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shadowed_requests(server) == 5
    finally:
        server.stop()


def test_monitoring_ratios_are_taken_within_each_repetition() -> None:
    reps = [
        {"default": {"cpu_us": 100.0}, "drift off": {"cpu_us": 90.0}},
        {"default": {"cpu_us": 200.0}, "drift off": {"cpu_us": 190.0}},
        {"default": {"cpu_us": 120.0}, "drift off": {"cpu_us": 60.0}},
    ]
    summary = summarise(reps)
    assert summary["default"]["cpu_us_ratio"] == 1.0
    assert summary["drift off"]["cpu_us"] == 90.0
    assert summary["drift off"]["cpu_us_ratio"] == pytest.approx(0.9)  # of 0.9, 0.95, 0.5


def _bench_server(server: RunningServer) -> Server:
    """The session's server as the benchmark sees one: its process, ports and metrics."""
    port = int(server.url.rpartition(":")[2])
    grpc_port = int(server.grpc_target.rpartition(":")[2])
    return Server("modelserve", "modelserve", port, server.process, server.log, grpc_port=grpc_port)


def test_a_framed_message_is_the_message_behind_a_length_prefix() -> None:
    message = infer_request("modelserve", Artifact("iris", 2), features("iris", 2), "raw")
    body = frame(message.SerializeToString())
    assert body[0] == 0  # not compressed
    assert int.from_bytes(body[1:5], "big") == len(body) - 5
    assert pb.ModelInferRequest.FromString(body[5:]) == message


@pytest.mark.parametrize("contents", ["contents", "raw"])
def test_grpc_messages_are_answered_correctly(
    server: RunningServer, trained_repository: Path, contents: Contents
) -> None:
    artifact = Artifact("iris", 2)
    rows = features("iris", 150)
    runtime = load_runtime(trained_repository, artifact, RuntimeOptions())
    expected = runtime.predict({"input": rows}).outputs
    response = call(server.grpc_target, infer_request("modelserve", artifact, rows, contents))
    assert bool(response.raw_output_contents) == (contents == "raw")
    answer = decode_response("modelserve", response, 3)
    assert answer.labels == [str(v) for v in expected["label"]]
    np.testing.assert_allclose(answer.probabilities, expected["probabilities"], atol=1e-6)


@needs_h2load
def test_h2load_loads_grpc_and_the_server_counts_every_call_ok(server: RunningServer) -> None:
    bench = _bench_server(server)
    message = infer_request("modelserve", Artifact("iris", 2), features("iris", 1), "contents")
    before = grpc_outcomes(bench)
    load = run_h2load(bench, message, 4, 0.5, cores="0,1")
    assert load.requests > 0
    assert 0.4 < load.seconds < 1.0
    assert 0 < load.p50_ms <= load.p99_ms
    assert load.cpu_us_per_request > 0
    assert (grpc_outcomes(bench) - before)[OK] >= load.requests


@needs_h2load
def test_h2load_run_fails_when_the_server_answers_grpc_errors(server: RunningServer) -> None:
    # HTTP 200 with grpc-status INVALID_ARGUMENT (30 features for iris's 4): h2load counts
    # each call as succeeded.
    rows = features("breast_cancer", 1)
    message = infer_request("modelserve", Artifact("iris", 2), rows, "contents")
    with pytest.raises(RuntimeError, match=r"gRPC iris: errors .*the server \{'400': \d+"):
        run_h2load(_bench_server(server), message, 2, 0.3, cores="0,1")


def test_h2load_summary_is_read_in_any_unit() -> None:
    output = (
        "finished in 500.12ms, 2000.00 req/s, 1.00MB/s\n"
        "requests: 1000 total, 1001 started, 1000 done, 998 succeeded, 2 failed, 2 errored, "
        "0 timeout\n"
    )
    succeeded, seconds = parse_summary(output)
    assert succeeded == 998
    assert seconds == pytest.approx(0.50012)


def _grpc(kind: str, artifact: str, **fields: object) -> dict[str, object]:
    return {"kind": kind, "rep": 0, "artifact": artifact, "server": "modelserve", **fields}


def test_report_sets_grpc_beside_rest_with_its_targets(tmp_path: Path) -> None:
    onnx = "iris v2 (onnx)"
    records = [
        _single("modelserve", onnx, 64, 5_000.0),  # 200 µs/request
        _grpc(
            "grpc_single", onnx, concurrency=64, rate=6_250.0, p50_ms=1.0, p99_ms=2.0, cpu_us=160.0
        ),
        _bulk("modelserve", "binary", 3e6),
        _grpc(
            "grpc_bulk",
            onnx,
            rows=10_000,
            encoding="raw",
            rows_per_s=2.4e6,
            p50_ms=4.0,
            cpu_us=4_000.0,
        ),
        _grpc(
            "grpc_bulk",
            onnx,
            rows=10_000,
            encoding="contents",
            rows_per_s=6e5,
            p50_ms=9.0,
            cpu_us=9_000.0,
        ),
    ]
    write_report(records, tmp_path, repeat=1, minutes=1.0)
    report = (tmp_path / "online.md").read_text()
    assert (
        "| iris ONNX, 1 row, c=64: gRPC server CPU µs/request / REST JSON's | 0.80 | <= 1 | yes |"
    ) in report
    assert (
        "| iris ONNX, 10,000 rows: gRPC raw contents rows/s / REST binary's "
        "| 0.80 | >= 1 | **no** |"
    ) in report
    # No joblib runs: that target is shown as not measured rather than dropped.
    assert "| iris joblib, 10,000 rows: gRPC raw contents rows/s / REST binary's | - |" in report
    assert (
        "| iris v2 (onnx) | modelserve | 64 | 6,250 | 1.00 | 2.00 | 160 | 5,000 | 0.80 | - |"
        in (report)
    )
    # Raw contents against the binary extension, typed contents against JSON (not measured).
    assert (
        "| iris v2 (onnx) | 10,000 | modelserve | raw | 2,400,000 | 4.0 | binary | 3,000,000 "
        "| 0.80 |" in (report)
    )
    assert "| iris v2 (onnx) | 10,000 | modelserve | contents | 600,000 | 9.0 | json | - | - |" in (
        report
    )


def test_grpc_targets_come_from_the_paired_runs_when_there_are_some(tmp_path: Path) -> None:
    onnx = "iris v2 (onnx)"
    records: list[dict[str, object]] = [
        _single("modelserve", onnx, 64, 5_000.0),  # 200 µs/request: the tables say 0.80
        _grpc(
            "grpc_single", onnx, concurrency=64, rate=6_250.0, p50_ms=1.0, p99_ms=2.0, cpu_us=160.0
        ),
    ]
    for rep, ratio in enumerate((1.2, 0.9, 0.95)):  # medians within each repetition
        records.append(
            {"kind": "grpc_pair", "rep": rep, "artifact": onnx, "rows": 1, "ratio": ratio}
        )
    records += [{**record, "rep": rep} for rep in (1, 2) for record in records[:2]]
    write_report(records, tmp_path, repeat=3, minutes=1.0)
    report = (tmp_path / "online.md").read_text()
    assert (
        "| iris ONNX, 1 row, c=64: gRPC server CPU µs/request / REST JSON's (paired runs) "
        "| 0.95 | <= 1 | yes |"
    ) in report


def test_raw_call_shares_come_from_the_paired_runs_when_there_are_some(tmp_path: Path) -> None:
    int_onnx, int_joblib = "iris_int v2 (onnx)", "iris_int v1 (joblib)"
    records: list[dict[str, object]] = []
    for rep, ratio in enumerate((0.7, 0.4, 0.55)):  # medians within each repetition
        records += [
            {
                "kind": "raw",
                "rep": rep,
                "artifact": int_onnx,
                "rows": 10_000,
                "session": 2e7,
                "runtime": 2e7,
            },
            {
                "kind": "raw",
                "rep": rep,
                "artifact": int_joblib,
                "rows": 10_000,
                "estimator": 5e6,
                "runtime": 3e7,
            },
            # The table's run says 0.40 of the raw session, the paired runs 0.55.
            {**_bulk("modelserve", "binary", 8e6), "rep": rep, "artifact": int_onnx},
            {**_bulk("modelserve", "binary", 5e6), "rep": rep, "artifact": int_joblib},
            {
                "kind": "share_pair",
                "rep": rep,
                "artifact": int_onnx,
                "raw": 2e7,
                "served": 1e7,
                "ratio": ratio,
            },
        ]
    write_report(records, tmp_path, repeat=3, minutes=1.0)
    report = (tmp_path / "online.md").read_text()
    assert (
        "| iris_int ONNX, 10,000 rows, binary: share of the raw session.run rows/s (paired runs) "
        "| 0.55 | >= 0.5 | yes |"
    ) in report
    # Without paired runs, the share comes from the tables.
    assert (
        "| iris_int joblib, 10,000 rows, binary: share of the raw predict + predict_proba rows/s "
        "| 1.00 | >= 0.8 | yes |"
    ) in report


def test_grpc_only_runs_name_the_servers_measured_over_grpc(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"--only \['modelserve \(no batching\)'\]: not among"):
        start_servers(
            tmp_path, tmp_path, tmp_path, peers=False, only=[OURS_UNBATCHED], grpc_only=True
        )


def _run_module(module: str, repository: Path, *options: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", module, "--repository", str(repository), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _driver(repository: Path, *options: str) -> subprocess.CompletedProcess[str]:
    small = ("--connections", "4", "--rounds", "4", "--repeats", "2")
    return _run_module("bench.online.driver", repository, *small, *options)


def test_the_driver_measures_answered_requests(trained_repository: Path) -> None:
    done = _driver(trained_repository)
    assert done.returncode == 0, done.stderr[-2000:]
    figure = float(done.stdout.split(" µs of CPU a request")[0])
    assert 0 < figure < 100_000
    # Every request it sent was answered, once: its access lines say so.
    answered = [line for line in done.stderr.splitlines() if "status=200" in line]
    # 4 connections, each sent a request in 2 warm-up rounds and 2 repeats of 4 rounds
    assert len(answered) == 4 * (2 + 2 * 4)


def test_the_driver_stops_on_an_answer_that_is_not_a_success(trained_repository: Path) -> None:
    done = _driver(trained_repository, "--version", "9")
    assert done.returncode != 0
    assert "answered b'HTTP/1.1 404" in done.stderr


def _grpc_driver(repository: Path, *options: str) -> subprocess.CompletedProcess[str]:
    small = ("--model", "iris", "--rows", "2000", "--calls", "4", "--repeats", "2")
    return _run_module("bench.online.grpc_driver", repository, *small, *options)


def test_the_grpc_driver_measures_answered_calls(trained_repository: Path) -> None:
    done = _grpc_driver(trained_repository)
    assert done.returncode == 0, done.stderr[-2000:]
    figure = float(done.stdout.split(" µs of CPU a call")[0])
    assert 0 < figure < 1_000_000
    # Every call it made was answered, once, with all its rows: its access lines say so.
    answered = [line for line in done.stderr.splitlines() if "protocol=grpc" in line]
    assert len(answered) == 1 + 2 * 4  # a warm-up call, then 2 repeats of 4
    assert all("status=200" in line and "rows=2000" in line for line in answered)


def test_the_grpc_driver_stops_on_a_call_that_fails(trained_repository: Path) -> None:
    done = _grpc_driver(trained_repository, "--version", "9")
    assert done.returncode != 0
    assert "b'grpc-status': b'5'" in done.stderr  # NOT_FOUND
