"""Every Prometheus metric of the service, defined once, on a registry the app injects."""

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.store.registry import ModelEntry

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
# Differences between a version's answers and its shadow's: from float32 rounding to disagreement.
DIFFERENCE_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
# A batch job: from a second to a working day.
JOB_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536, 262144, 1048576)


def adder(child: Any) -> Callable[[float], None]:
    """What adds to a labelled counter or gauge (negative amounts too, for a gauge) on the
    request path: its value's own `inc`. The public `inc` checks on every call that the metric
    is not a parent, and that a counter's amount is not negative, which a bound child on the
    request path never needs; where prometheus_client keeps its values otherwise, the public
    method."""
    inc = getattr(getattr(child, "_value", None), "inc", None)
    if callable(inc):
        return cast(Callable[[float], None], inc)
    return cast(Callable[[float], None], child.inc)


class _Observer:
    """A histogram child's observe as prometheus_client does it, its bucket found by bisection
    rather than a Python loop over the bounds."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, bounds: list[float], buckets: list[Any], total: Any) -> None:
        self._bounds, self._buckets, self._sum = bounds, buckets, total

    def __call__(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect_left(self._bounds, amount)].inc(1)


def observing(child: Any) -> Callable[[float], None]:
    """What observes into a labelled histogram on the request path (see `adder`)."""
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if (
        isinstance(bounds, list)
        and isinstance(buckets, list)
        and len(bounds) == len(buckets)
        and bounds
        and bounds[-1] == float("inf")
        and all(callable(getattr(b, "inc", None)) for b in [*buckets, total])
    ):
        return _Observer(bounds, buckets, total)
    return cast(Callable[[float], None], child.observe)


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
    last_inference: Gauge
    shadow_requests: Counter
    shadow_rows: Counter
    shadow_agreement: Gauge
    shadow_difference: Histogram
    shadow_duration: Histogram
    feature_psi: Gauge
    prediction_psi: Gauge
    feature_out_of_range: Counter
    feature_missing: Counter
    job_rows: Counter
    job_duration: Histogram
    rate_limited: Counter
    payload_records: Counter
    # What counts into `requests` and `request_duration` by (model, version, protocol,
    # status): looking a child up through `labels` costs a request more than counting it.
    _request_children: dict[
        tuple[str, str, str, int],
        tuple[Callable[[float], None], Callable[[float], None] | None],
    ] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def inflight_add(self) -> Callable[[float], None]:
        return adder(self.inflight)

    def request_done(
        self, model: str, version: str, protocol: str, status: int, seconds: float
    ) -> None:
        """Count one answered request; its time only when it succeeded (errors would blur it)."""
        key = (model, version, protocol, status)
        children = self._request_children.get(key)
        if children is None:
            count = adder(self.requests.labels(model, version, protocol, str(status)))
            duration = observing(self.request_duration.labels(model, version, protocol))
            children = self._request_children[key] = (count, duration if status == 200 else None)
        children[0](1)
        if children[1] is not None:
            children[1](seconds)


def create_metrics(registry: CollectorRegistry) -> Metrics:
    mv = ["model", "version"]
    return Metrics(
        requests=Counter(
            "modelserve_requests",
            "Inference requests (V2, V1, :score) by resolved model and status code.",
            [*mv, "protocol", "code"],
            registry=registry,
        ),
        request_duration=Histogram(
            "modelserve_request_duration_seconds",
            "Time a successful request spent in the server: from its headers to its answer "
            "(for :score, to the last byte of its answer).",
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
            "Inference requests inside the server, from their headers to their answer.",
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
        # With several workers a version is ready only if every live worker serves it.
        model_ready=Gauge(
            "modelserve_model_ready",
            "1 if the model version serves.",
            mv,
            registry=registry,
            multiprocess_mode="livemin",
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
            "Model versions as loaded: 1 while loaded, 0 once replaced or unloaded.",
            [*mv, "format", "sha256"],
            registry=registry,
            multiprocess_mode="livemax",
        ),
        predictions=Counter(
            "modelserve_predictions", "Predicted class labels.", [*mv, "label"], registry=registry
        ),
        shadow_requests=Counter(
            "modelserve_shadow_requests",
            "Requests mirrored to a shadow version, by outcome: compared, dropped (the shadow "
            "fell behind), failed.",
            [*mv, "shadow_version", "outcome"],
            registry=registry,
        ),
        shadow_rows=Counter(
            "modelserve_shadow_rows",
            "Rows a classifier and its shadow both labelled, by whether the labels agree.",
            [*mv, "shadow_version", "labels"],
            registry=registry,
        ),
        # Per worker, the share of agreeing rows so far; the rows counter gives the exact
        # ratio over every worker (sum of "same" over the sum of both).
        shadow_agreement=Gauge(
            "modelserve_shadow_label_agreement_ratio",
            "Share of compared rows whose shadow label equals the version's.",
            [*mv, "shadow_version"],
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        shadow_difference=Histogram(
            "modelserve_shadow_difference",
            "Per compared request, the largest difference from the shadow's answer: absolute "
            "probability difference (classifiers), relative prediction difference (regressors).",
            [*mv, "shadow_version"],
            buckets=DIFFERENCE_BUCKETS,
            registry=registry,
        ),
        shadow_duration=Histogram(
            "modelserve_shadow_duration_seconds",
            "Time of a shadow request, from mirroring to its answer.",
            [*mv, "shadow_version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        # Each worker's own window: the most recently updated one is exposed (README: drift).
        feature_psi=Gauge(
            "modelserve_feature_drift_psi",
            "Population Stability Index of a feature over the recent rows against the version's "
            "reference profile (0.1: watch, 0.25: drifted).",
            [*mv, "feature"],
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        prediction_psi=Gauge(
            "modelserve_prediction_drift_psi",
            "Population Stability Index of the predictions over the recent rows against the "
            "version's reference profile.",
            mv,
            registry=registry,
            multiprocess_mode="mostrecent",
        ),
        feature_out_of_range=Counter(
            "modelserve_feature_out_of_range",
            "Feature values outside the training range (below its min or above its max).",
            [*mv, "feature"],
            registry=registry,
        ),
        feature_missing=Counter(
            "modelserve_feature_missing",
            "Missing (NaN) feature values.",
            [*mv, "feature"],
            registry=registry,
        ),
        job_rows=Counter(
            "modelserve_job_rows",
            "Rows scored by batch jobs that succeeded.",
            mv,
            registry=registry,
        ),
        job_duration=Histogram(
            "modelserve_job_duration_seconds",
            "Time of a batch job's run, from its claim to its end state (succeeded, failed, "
            "cancelled).",
            ["state"],
            buckets=JOB_BUCKETS,
            registry=registry,
        ),
        # By the class of client only: a key, subject or address would be a credential's trace
        # and an unbounded label.
        rate_limited=Counter(
            "modelserve_rate_limited",
            "Requests refused (429) because their client was over MODELSERVE_RATE_LIMIT.",
            ["client_class"],
            registry=registry,
        ),
        payload_records=Counter(
            "modelserve_payload_records",
            "Sampled requests of the payload log, by outcome: written (the sink took them), "
            "dropped (the queue was full: the sink is slow or down), failed (the sink refused "
            "them or could not be reached).",
            [*mv, "outcome"],
            registry=registry,
        ),
        # "max" keeps the time of exited workers too: it is the last inference of any of them.
        last_inference=Gauge(
            "modelserve_last_inference_timestamp_seconds",
            "Unix time at which the model version last finished a model call.",
            mv,
            registry=registry,
            multiprocess_mode="max",
        ),
    )


def record_model(
    metrics: Metrics, entry: ModelEntry | None, previous: ModelEntry | None = None
) -> None:
    """Bring the model-state metrics in line with a model as loaded (or unloaded: None)."""
    if previous is not None:
        # Set to 0 rather than removed: removal does not reach the files of multiprocess mode,
        # and both modes should expose the same series.
        for number, old in previous.versions.items():
            labels = (previous.name, str(number))
            metrics.model_ready.labels(*labels).set(0)
            metrics.model_info.labels(*labels, old.format, old.sha256[:12]).set(0)
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
    for failure in entry.stale.values():  # still serving the previous artifact: ready
        metrics.model_load_failures.labels(entry.name, failure.reason).inc()


class JobStates(Collector):
    """modelserve_jobs{state}: jobs by state, read from the job store at each scrape, so every
    worker answers the same (the queue length is state="queued")."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "modelserve_jobs", "Batch jobs kept, by state.", labels=["state"]
        )
        for state, count in self.counts().items():
            family.add_metric([state], count)
        yield family
