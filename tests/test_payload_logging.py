"""Payload logging against real servers: what a record holds, rotation, the sampling rate,
CloudEvents to an HTTP sink, and sinks that are slow or down while inference goes on."""

import re
import shutil
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.config import Settings
from service.observability.payload_sinks import JsonLinesFile, PayloadRecord
from tests.grpcclient import tritonclient_grpc
from tests.scrape import IRIS, scrape, total
from tests.serving import free_port, run_server, wait_for

ROW = IRIS[:1]
V2_BODY = {
    "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of the payload log at `path` and its rotated files, oldest first."""
    files = sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: -int(p.suffix[1:]))
    lines: list[dict[str, Any]] = []
    for file in [*files, path] if path.exists() else files:
        lines.extend(orjson.loads(line) for line in file.read_bytes().splitlines())
    return lines


def outcomes(url: str) -> dict[str, float]:
    samples = scrape(url)
    return {
        outcome: total(samples, "modelserve_payload_records_total", outcome=outcome)
        for outcome in ("written", "dropped", "failed")
    }


def repository_with(iris_repository: Path, target: Path, model_toml_extra: str) -> Path:
    """A copy of the iris repository whose model.toml has `model_toml_extra` appended."""
    shutil.copytree(iris_repository, target)
    toml = target / "iris" / "model.toml"
    toml.write_text(toml.read_text() + model_toml_extra)
    return target


@pytest.mark.e2e
def test_records_of_every_protocol_survive_rotation_with_two_workers(
    iris_repository: Path, tmp_path: Path
) -> None:
    log = tmp_path / "payloads" / "requests.jsonl"
    env = {
        "MODELSERVE_PAYLOAD_LOG_RATE": "1",
        "MODELSERVE_PAYLOAD_LOG_FILE": str(log),
        "MODELSERVE_PAYLOAD_LOG_MAX_BYTES": "2000",
        "MODELSERVE_PAYLOAD_LOG_BACKUPS": "1000",
    }
    with run_server(iris_repository, tmp_path, env, ("--workers", "2")) as server:
        wait_for(lambda: server.output().count("Application startup complete") >= 2)
        with httpx.Client(base_url=server.url) as http:
            sent = []
            for number in range(60):
                request_id = f"v2-{number}"
                response = http.post(
                    "/v2/models/iris/versions/1/infer",
                    json=V2_BODY,
                    headers={"X-Request-ID": request_id},
                )
                assert response.status_code == 200, response.text
                sent.append(request_id)
            answer = http.post(
                "/v1/models/iris:predict", json={"instances": [[6.3, 3.3, 6.0, 2.5]]}
            )
            assert answer.status_code == 200, answer.text
            sent.append(answer.headers["x-request-id"])
        triton = tritonclient_grpc()
        client = triton.InferenceServerClient(server.grpc_target)
        tensor = triton.InferInput("input", [1, 4], "FP32")
        tensor.set_data_from_numpy(ROW)
        client.infer("iris", [tensor], headers={"x-request-id": "grpc-1"})
        client.close()
        sent.append("grpc-1")
        wait_for(lambda: len(records(log)) >= len(sent), 10, "every request in the log")
        counted = outcomes(server.url)

    logged = records(log)
    assert sorted(r["id"] for r in logged) == sorted(sent), "each request logged exactly once"
    assert counted == {"written": len(sent), "dropped": 0, "failed": 0}
    files = list(log.parent.glob("requests.jsonl*"))
    assert len(files) > 5, "the log rotated"
    assert all(f.stat().st_size <= 2000 for f in files), "no file grew past max bytes"
    by_id = {r["id"]: r for r in logged}
    first = by_id["v2-0"]
    assert (first["model"], first["version"], first["endpoint"]) == ("iris", "1", "canary")
    assert first["inputs"] == [
        {
            "name": "input",
            "datatype": "FP32",
            "shape": [1, 4],
            "data": pytest.approx([5.1, 3.5, 1.4, 0.2]),
        }
    ]
    assert {o["name"]: o["data"] for o in first["outputs"]}["label"] == ["setosa"]
    v1 = by_id[sent[60]]
    assert (v1["version"], v1["endpoint"]) == ("2", "default")
    assert {o["name"]: o["data"] for o in v1["outputs"]}["label"] == ["virginica"]
    assert by_id["grpc-1"]["inputs"][0]["data"] == pytest.approx(ROW.reshape(-1).tolist())


def test_rotation_keeps_the_newest_records_whole(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    sink = JsonLinesFile(path, max_bytes=600, backups=2)
    rows = np.ones((1, 4), np.float32)
    for number in range(40):
        record = PayloadRecord(
            f"r{number}", "iris", 1, "default", 0.0, {"input": rows}, {"label": np.array(["a"])}
        )
        sink.write([record])
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "log.jsonl.1", "log.jsonl.2"]
    kept = [r["id"] for r in records(path)]
    assert kept == [f"r{n}" for n in range(40 - len(kept), 40)], "the newest, in order, none lost"
    assert all(p.stat().st_size <= 600 for p in tmp_path.iterdir())


@pytest.mark.e2e
def test_a_models_own_rate_holds_within_binomial_bounds(
    iris_repository: Path, tmp_path: Path
) -> None:
    log = tmp_path / "requests.jsonl"
    repository = repository_with(
        iris_repository, tmp_path / "models", "\n[payload_log]\nrate = 0.3\n"
    )
    env = {"MODELSERVE_PAYLOAD_LOG_FILE": str(log)}  # the global rate stays 0
    sent = 2000
    with run_server(repository, tmp_path, env) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(sent):
            assert http.post("/v2/models/iris/infer", json=V2_BODY).status_code == 200
        wait_for(lambda: sum(outcomes(server.url).values()) == len(records(log)), 10)
        counted = outcomes(server.url)
    logged = len(records(log))
    # 0.3 of 2000: mean 600, standard deviation 20.5; five of them either side.
    assert 600 - 103 <= logged <= 600 + 103, f"{logged} of {sent} logged at rate 0.3"
    assert counted["written"] == logged
    assert counted["dropped"] == 0


@dataclass
class Sink:
    """An HTTP sink on loopback that records the events it gets, answering after `delay_s`."""

    url: str
    events: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delay_s: float = 0.0


@pytest.fixture
def sink() -> Iterator[Sink]:
    state = Sink("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            time.sleep(state.delay_s)
            state.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_port}/events"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.mark.e2e
def test_cloudevents_in_the_shape_of_kserves_logger(
    iris_repository: Path, tmp_path: Path, sink: Sink
) -> None:
    env = {"MODELSERVE_PAYLOAD_LOG_RATE": "1", "MODELSERVE_PAYLOAD_LOG_URL": sink.url}
    with run_server(iris_repository, tmp_path, env) as server:
        response = httpx.post(
            f"{server.url}/v2/models/iris/infer", json=V2_BODY, headers={"X-Request-ID": "ce-1"}
        )
        assert response.status_code == 200
        wait_for(lambda: len(sink.events) == 2, 10, "two events at the sink")
    (request_headers, request_body), (response_headers, response_body) = sink.events
    for headers, kind in (
        (request_headers, "org.kubeflow.serving.inference.request"),
        (response_headers, "org.kubeflow.serving.inference.response"),
    ):
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-id"] == "ce-1"
        assert headers["ce-type"] == kind
        assert headers["ce-inferenceservicename"] == "iris"
        assert headers["ce-endpoint"] == "default"
        assert headers["ce-modelversion"] == "2"
        assert headers["ce-source"].startswith("http://")
        assert headers["ce-time"].endswith("Z")
        assert headers["content-type"] == "application/json"
    sent = orjson.loads(request_body)
    assert sent["id"] == "ce-1"
    assert sent["inputs"][0]["data"] == pytest.approx(V2_BODY["inputs"][0]["data"])
    answered = orjson.loads(response_body)
    assert (answered["model_name"], answered["model_version"], answered["id"]) == (
        "iris",
        "2",
        "ce-1",
    )
    assert answered["outputs"] == response.json()["outputs"]


def p50_of_requests(http: httpx.Client, count: int) -> float:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        response = http.post("/v2/models/iris/infer", json=V2_BODY)
        seconds.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return statistics.median(seconds)


@pytest.mark.e2e
@pytest.mark.parametrize("sink_state", ["slow", "down"])
def test_a_slow_or_down_sink_neither_slows_nor_fails_inference(
    iris_repository: Path, tmp_path: Path, sink: Sink, sink_state: str
) -> None:
    toml = tmp_path / "models" / "iris" / "model.toml"
    repository = repository_with(
        iris_repository, tmp_path / "models", "\n[payload_log]\nrate = 0\n"
    )
    sink.delay_s = 0.5
    url = sink.url if sink_state == "slow" else f"http://127.0.0.1:{free_port()}/"
    env = {
        "MODELSERVE_PAYLOAD_LOG_RATE": "1",
        "MODELSERVE_PAYLOAD_LOG_URL": url,
        "MODELSERVE_PAYLOAD_LOG_QUEUE": "4",
        "MODELSERVE_PAYLOAD_LOG_TIMEOUT_S": "2",
        "MODELSERVE_ROUTING_SYNC_S": "0.2",
    }
    with run_server(repository, tmp_path, env) as server, httpx.Client(base_url=server.url) as http:
        p50_unlogged = p50_of_requests(http, 200)
        assert sum(outcomes(server.url).values()) == 0, "a model's rate 0 overrides the global 1"
        # Every request logged from here on, once the workers apply the changed model.toml.
        toml.write_text(toml.read_text().replace("rate = 0\n", "rate = 1\n"))

        def logging() -> bool:
            p50_of_requests(http, 1)
            return sum(outcomes(server.url).values()) > 0

        wait_for(logging, 10, "requests logged at the model's new rate")
        p50_logged = p50_of_requests(http, 200)
        counted = outcomes(server.url)
    lost = "dropped" if sink_state == "slow" else "failed"
    assert counted[lost] > 100, counted
    # Generous: the two medians differ by noise; a request waiting for the sink would take
    # the sink's 0.5 s, a failing one would answer 500.
    assert p50_logged < 2 * p50_unlogged + 0.002, (p50_unlogged, p50_logged)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"payload_log_rate": 0.5}, "needs a sink: set MODELSERVE_PAYLOAD_LOG_FILE"),
        (
            {"payload_log_file": Path("a.jsonl"), "payload_log_url": "http://127.0.0.1:9/"},
            "MODELSERVE_PAYLOAD_LOG_FILE or MODELSERVE_PAYLOAD_LOG_URL, not both",
        ),
        ({"payload_log_url": "127.0.0.1:9"}, "must be an http:// or https:// URL"),
        ({"payload_log_rate": 1.5}, "less than or equal to 1"),
    ],
)
def test_settings_that_cannot_log_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings(**settings)
