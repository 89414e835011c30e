"""GET /metrics of real servers: the names of the design, bounded labels, exact counts, promtool."""

import shutil
import subprocess

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from service.observability.metrics import LATENCY_BUCKETS, adder, observing
from tests.scrape import scrape, send, total
from tests.serving import RunningServer

# `any_server` picks its server by name, out of sight of tests/conftest.py's automatic mark.
pytestmark = pytest.mark.e2e

# DESIGN §5, plus the time of the last model call (for the statistics extension).
METRICS = {
    "modelserve_requests": ("counter", {"model", "version", "protocol", "code"}),
    "modelserve_request_duration_seconds": ("histogram", {"model", "version", "protocol"}),
    "modelserve_queue_duration_seconds": ("histogram", {"model", "version"}),
    "modelserve_compute_duration_seconds": ("histogram", {"model", "version"}),
    "modelserve_batch_rows": ("histogram", {"model", "version"}),
    "modelserve_inference_rows": ("counter", {"model", "version"}),
    "modelserve_inflight_requests": ("gauge", set()),
    "modelserve_queue_depth": ("gauge", {"model", "version"}),
    "modelserve_model_ready": ("gauge", {"model", "version"}),
    "modelserve_model_load_duration_seconds": ("gauge", {"model", "version"}),
    "modelserve_model_load_failures": ("counter", {"model", "reason"}),
    "modelserve_model_info": ("gauge", {"model", "version", "format", "sha256"}),
    "modelserve_predictions": ("counter", {"model", "version", "label"}),
    "modelserve_last_inference_timestamp_seconds": ("gauge", {"model", "version"}),
}
PLAN = [
    ("iris", "1", "v2", 3),
    ("iris", "2", "v1", 2),
    ("diabetes", "1", "v2", 4),
    ("breast_cancer", "2", "v1", 1),
]


@pytest.fixture(params=["server", "workers_server"])
def any_server(request: pytest.FixtureRequest) -> RunningServer:
    """The one-worker and the two-worker server: both must expose the same metrics."""
    running: RunningServer = request.getfixturevalue(request.param)
    return running


def test_every_metric_of_the_design_is_exposed_with_its_labels(
    workers_server: RunningServer,
) -> None:
    send(workers_server.url, PLAN, "names")
    text = httpx.get(f"{workers_server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, labels) in METRICS.items():
        family = families.get(name)
        assert family is not None, f"{name} is not exposed"
        assert family.type == kind, name
        assert family.samples, f"{name} has no samples"
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample
    # Buckets resolve sub-millisecond inference, and the failed iris version 3 is counted.
    assert 'le="0.0001"' in text
    assert families["modelserve_model_load_failures"].samples[0].labels["model"] == "iris"


def test_one_worker_exposes_process_metrics_and_no_created_series(server: RunningServer) -> None:
    samples = scrape(server.url)
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"} <= names
    assert not [n for n in names if n.endswith("_created")]


def test_two_workers_expose_process_metrics_per_worker(workers_server: RunningServer) -> None:
    samples = scrape(workers_server.url)
    pids = {dict(labels)["pid"] for name, labels in samples if name == "process_cpu_seconds_total"}
    assert len(pids) == 2
    assert not [n for n, _ in samples if n.endswith("_created")]
    # Live gauges are not summed over workers: a ready version is 1, not 2.
    assert total(samples, "modelserve_model_ready", model="iris", version="1") == 1.0
    assert total(samples, "modelserve_model_ready", model="iris", version="3") == 0.0
    assert total(samples, "modelserve_inflight_requests") == 0.0


def test_counters_move_by_exactly_the_requests_and_rows_sent(any_server: RunningServer) -> None:
    before = scrape(any_server.url)
    sent = send(any_server.url, PLAN * 3, "exact")
    after = scrape(any_server.url)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for (model, version, protocol), count in sent.requests.items():
        labels = {"model": model, "version": version, "protocol": protocol}
        assert delta("modelserve_requests_total", code="200", **labels) == count
        assert delta("modelserve_request_duration_seconds_count", **labels) == count
    for (model, version), rows in sent.rows.items():
        assert delta("modelserve_inference_rows_total", model=model, version=version) == rows
        assert delta("modelserve_batch_rows_sum", model=model, version=version) == rows
    for (model, version, label), count in sent.labels.items():
        labels = {"model": model, "version": version, "label": label}
        assert delta("modelserve_predictions_total", **labels) == count
    assert delta("modelserve_inference_rows_total") == sum(sent.rows.values())


def test_requests_for_unknown_models_add_no_series(any_server: RunningServer) -> None:
    send(any_server.url, PLAN, "warm")  # every series these requests could touch exists
    before = {s for s in scrape(any_server.url) if s[0].startswith("modelserve_")}
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    with httpx.Client(base_url=any_server.url) as http:
        for path in (
            "/v2/models/no-such-model/infer",
            "/v2/models/no-such-model/versions/7/infer",
            "/v2/models/iris/versions/99/infer",
            "/v2/models/iris/versions/not-an-alias/infer",
            "/v1/models/no-such-model:predict",
        ):
            assert http.post(path, json=body).status_code == 404, path
    after = {s for s in scrape(any_server.url) if s[0].startswith("modelserve_")}
    assert after == before


def test_a_bad_request_for_a_known_version_counts_as_its_error(
    workers_server: RunningServer,
) -> None:
    labels = {"model": "iris", "version": "2", "protocol": "v2", "code": "400"}
    before = total(scrape(workers_server.url), "modelserve_requests_total", **labels)
    response = httpx.post(f"{workers_server.url}/v2/models/iris/versions/2/infer", json={})
    assert response.status_code == 400
    after = total(scrape(workers_server.url), "modelserve_requests_total", **labels)
    assert after - before == 1


def test_promtool_finds_no_problems(any_server: RunningServer) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing; scripts/prometheus.sh installs it"
    send(any_server.url, PLAN, "promtool")
    text = httpx.get(f"{any_server.url}/metrics").text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""


def _exposition(registry: CollectorRegistry) -> list[tuple[str, list[tuple[str, str]], float]]:
    return sorted(
        (sample.name, sorted(sample.labels.items()), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    )


def test_the_request_path_counts_as_prometheus_client_does() -> None:
    # Values on bucket bounds, between them, past the last and at zero; counts, and a gauge
    # going down: written through the public methods and through ours, exposed alike.
    amounts = [0.0, 0.0001, 0.00012, 0.001, 0.0049, 0.5, 10.0, 11.0, 1e9]
    registries = []
    for fast in (False, True):
        registry = CollectorRegistry()
        histogram = Histogram("h", "h", ["m"], buckets=LATENCY_BUCKETS, registry=registry)
        counter = Counter("c", "c", ["m"], registry=registry)
        gauge = Gauge("g", "g", registry=registry)
        child, count = histogram.labels("a"), counter.labels("a")
        for amount in amounts:
            if fast:
                observing(child)(amount)
                adder(count)(3)
                adder(gauge)(1)
                adder(gauge)(-2)
            else:
                child.observe(amount)
                count.inc(3)
                gauge.inc()
                gauge.dec(2)
        registries.append(_exposition(registry))
    assert registries[0] == registries[1]
    assert ("h_bucket", [("le", "0.0001"), ("m", "a")], 2.0) in registries[1]
