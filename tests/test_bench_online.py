"""The online benchmark's own parts: raw-call measurement, bodies, servers and the report."""

import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.online.__main__ import start_servers
from bench.online.monitoring import requests_for, shadowed_copy, shadowed_requests, summarise
from bench.online.raw import load_runtime, measure_raw
from bench.online.report import write_report
from bench.online.servers import start_modelserve, wait_for_model
from bench.online.workload import Artifact, Encoding, build_request, decode_answer, features
from service.store.runtimes import RuntimeOptions


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
