"""Every Prometheus metric of the service, defined once, on a registry the app injects."""

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.registry import ModelEntry

# 100 µs to 10 s: sub-millisecond CPU inference must land in distinct buckets.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536, 262144, 1048576)


@dataclass(frozen=True)
class Metrics:
    requests: Counter
    request_duration: Histogram
    queue_duration: Histogram
    compute_duration: Histogram
    batch_rows: Histogram
    inference_rows: Counter
    inflight: Gauge
    queue_depth: Gauge
    model_ready: Gauge
    model_load_duration: Gauge
    model_load_failures: Counter
    model_info: Gauge
    predictions: Counter


def create_metrics(registry: CollectorRegistry) -> Metrics:
    mv = ["model", "version"]
    return Metrics(
        requests=Counter(
            "modelserve_requests",
            "Inference requests by outcome.",
            [*mv, "protocol", "code"],
            registry=registry,
        ),
        request_duration=Histogram(
            "modelserve_request_duration_seconds",
            "Time from decoding a request to encoding its answer.",
            [*mv, "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        queue_duration=Histogram(
            "modelserve_queue_duration_seconds",
            "Time a request waited for the model.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        compute_duration=Histogram(
            "modelserve_compute_duration_seconds",
            "Time of one model call.",
            mv,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        batch_rows=Histogram(
            "modelserve_batch_rows",
            "Rows per model call.",
            mv,
            buckets=ROW_BUCKETS,
            registry=registry,
        ),
        inference_rows=Counter(
            "modelserve_inference_rows", "Rows inferred.", mv, registry=registry
        ),
        inflight=Gauge(
            "modelserve_inflight_requests",
            "Inference requests being served.",
            registry=registry,
            multiprocess_mode="livesum",
        ),
        queue_depth=Gauge(
            "modelserve_queue_depth",
            "Requests waiting for a model call.",
            mv,
            registry=registry,
            multiprocess_mode="livesum",
        ),
        model_ready=Gauge(
            "modelserve_model_ready",
            "1 if the model version serves.",
            mv,
            registry=registry,
            multiprocess_mode="livemax",
        ),
        model_load_duration=Gauge(
            "modelserve_model_load_duration_seconds",
            "Time to load the model version.",
            mv,
            registry=registry,
            multiprocess_mode="livemax",
        ),
        model_load_failures=Counter(
            "modelserve_model_load_failures",
            "Model versions that failed to load, by reason.",
            ["model", "reason"],
            registry=registry,
        ),
        model_info=Gauge(
            "modelserve_model_info",
            "Loaded model versions (value 1).",
            [*mv, "format", "sha256"],
            registry=registry,
            multiprocess_mode="livemax",
        ),
        predictions=Counter(
            "modelserve_predictions", "Predicted class labels.", [*mv, "label"], registry=registry
        ),
    )


def record_model(
    metrics: Metrics, entry: ModelEntry | None, previous: ModelEntry | None = None
) -> None:
    """Bring the model-state metrics in line with a model as loaded (or unloaded: None)."""
    if previous is not None:
        for number, old in previous.versions.items():
            metrics.model_ready.labels(previous.name, str(number)).set(0)
            metrics.model_info.remove(previous.name, str(number), old.format, old.sha256[:12])
    if entry is None:
        return
    for number, model in entry.versions.items():
        labels = (entry.name, str(number))
        metrics.model_ready.labels(*labels).set(1)
        metrics.model_load_duration.labels(*labels).set(model.load_seconds)
        metrics.model_info.labels(*labels, model.format, model.sha256[:12]).set(1)
    for number, failure in entry.failures.items():
        metrics.model_ready.labels(entry.name, str(number)).set(0)
        metrics.model_load_failures.labels(entry.name, failure.reason).inc()
