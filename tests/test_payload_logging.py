"""Payload logging: what a record holds, rotation, the sampling rate, CloudEvents to an HTTP
sink, and sinks that are slow or down while inference goes on (real servers where the
behaviour is the server's; the sampling rate on the payload log itself, over many draws)."""

import asyncio
import math
import re
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from service.config import Settings
from service.observability.metrics import create_metrics
from service.observability.payload_sinks import JsonLinesFile, PayloadRecord
from service.observability.payloads import PayloadLog
from service.store.registry import LoadOptions, ModelEntry, load_version
from service.store.repository import ModelConfig, PayloadLogConfig
from tests.grpcclient import tritonclient_grpc
from tests.scrape import IRIS, scrape, total
from tests.serving import run_server, wait_for

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
        # Counted, then read: files read while a worker rotates could be renamed under us.
        wait_for(lambda: sum(outcomes(server.url).values()) >= len(sent), 10, "all logged")
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


def sample(log: PayloadLog, entry: ModelEntry, count: int) -> None:
    """Offers `count` requests to `log` while its writer runs, then lets it finish."""
    model = entry.versions[1]
    inputs, outputs = {"input": ROW}, {"label": np.array(["setosa"])}

    async def offer_all() -> None:
        writer = asyncio.create_task(log.run())
        for number in range(count):
            log.offer(entry, model, f"r{number}", inputs, outputs)
            if number % 1000 == 0:
                await asyncio.sleep(0)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)

    asyncio.run(offer_all())


@pytest.mark.parametrize(
    ("global_rate", "own_rate", "expected"), [(0.0, 0.3, 0.3), (0.3, None, 0.3), (1.0, 0.0, 0.0)]
)
def test_requests_are_sampled_at_their_models_rate(
    iris_repository: Path,
    tmp_path: Path,
    global_rate: float,
    own_rate: float | None,
    expected: float,
) -> None:
    model = load_version("iris", 1, iris_repository / "iris" / "1", LoadOptions(), (0, 0.0))
    config = ModelConfig(payload_log=PayloadLogConfig(rate=own_rate))
    entry = ModelEntry("iris", {1: model}, {}, 1, {}, config=config)
    registry = CollectorRegistry()
    path = tmp_path / "log.jsonl"
    log = PayloadLog(JsonLinesFile(path, 10**9, 0), global_rate, 20_000, create_metrics(registry))
    sent = 20_000
    sample(log, entry, sent)
    logged = len(records(path))
    # Binomial: at 0.3 of 20,000, mean 6,000 and standard deviation 65; five of them either side.
    spread = 5 * math.sqrt(sent * expected * (1 - expected))
    assert abs(logged - sent * expected) <= spread, f"{logged} of {sent} logged at {expected}"
    written = registry.get_sample_value(
        "modelserve_payload_records_total", {"model": "iris", "version": "1", "outcome": "written"}
    )
    assert (written or 0) == logged


@dataclass
class Sink:
    """An HTTP sink on loopback that records the events it gets, answering after `delay_s`."""

    url: str
    stop: Callable[[], None]
    events: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    delay_s: float = 0.0


@pytest.fixture
def sink() -> Iterator[Sink]:
    state = Sink("", lambda: None)

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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped = True

    state.url, state.stop = f"http://127.0.0.1:{server.server_port}/events", stop
    yield state
    stop()


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
def test_a_slow_or_down_sink_neither_slows_nor_fails_inference(
    iris_repository: Path, tmp_path: Path, sink: Sink
) -> None:
    toml = tmp_path / "models" / "iris" / "model.toml"
    repository = repository_with(
        iris_repository, tmp_path / "models", "\n[payload_log]\nrate = 0\n"
    )
    env = {
        "MODELSERVE_PAYLOAD_LOG_RATE": "1",
        "MODELSERVE_PAYLOAD_LOG_URL": sink.url,
        "MODELSERVE_PAYLOAD_LOG_QUEUE": "4",
        "MODELSERVE_PAYLOAD_LOG_TIMEOUT_S": "2",
        "MODELSERVE_ROUTING_SYNC_S": "0.2",
    }
    with run_server(repository, tmp_path, env) as server, httpx.Client(base_url=server.url) as http:
        p50_unlogged = p50_of_requests(http, 150)
        assert sum(outcomes(server.url).values()) == 0, "a model's rate 0 overrides the global 1"
        # Slow: each event answered after half a second, so the queue of 4 fills at once.
        sink.delay_s = 0.5
        toml.write_text(toml.read_text().replace("rate = 0\n", "rate = 1\n"))

        def logging() -> bool:
            p50_of_requests(http, 1)
            return sum(outcomes(server.url).values()) > 0

        wait_for(logging, 10, "requests logged at the model's new rate")
        p50_slow = p50_of_requests(http, 150)
        slow = outcomes(server.url)
        # Down: nothing listens on the sink's port any more.
        sink.stop()
        p50_down = p50_of_requests(http, 150)

        def failing() -> bool:
            # The queue holds 4 records and the writer takes them every 50 ms: how many fail
            # in a burst depends on how fast the burst is, so requests go on until 50 have.
            p50_of_requests(http, 5)
            return outcomes(server.url)["failed"] > 50

        wait_for(failing, 30, "posts to a closed port fail")
        down = outcomes(server.url)
    assert slow["dropped"] > 100, slow
    assert down["failed"] > 50, down
    # Generous: the medians differ by noise; a request that waited for the sink would take
    # its 0.5 s, one that failed with it would not answer 200.
    assert p50_slow < 2 * p50_unlogged + 0.002, (p50_unlogged, p50_slow)
    assert p50_down < 2 * p50_unlogged + 0.002, (p50_unlogged, p50_down)


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
