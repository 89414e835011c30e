"""The statistics extension: Triton's per-version statistics, read back from the metrics.

They are computed from the registry that GET /metrics serves, so they are the numbers
Prometheus scrapes and, with several workers, add up over the workers the same way.

How the metrics map onto Triton's fields:
- success: successful requests and their time (the request duration histogram);
- fail: requests answered with an error status (their time is not measured: ns is 0);
- queue: per request, the time waiting for the model;
- compute_infer, execution_count: per model call (a call may serve several requests);
- inference_count: rows inferred; last_inference: end of the last model call, in ms;
- compute_input, compute_output, batch_stats: not measured apart (batch sizes are in the
  `modelserve_batch_rows` histogram);
- shadow (modelserve's own key): per shadow version, the `modelserve_shadow_*` metrics.
"""

from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from service.protocols.schemas import (
    InferenceStatistics,
    InferStatistics,
    ModelStatistics,
    ShadowStatistics,
    StatisticDuration,
)

_FAILED = "modelserve_requests_total:failed"
_SAMPLES = frozenset(
    {
        "modelserve_requests_total",
        "modelserve_request_duration_seconds_count",
        "modelserve_request_duration_seconds_sum",
        "modelserve_queue_duration_seconds_count",
        "modelserve_queue_duration_seconds_sum",
        "modelserve_compute_duration_seconds_count",
        "modelserve_compute_duration_seconds_sum",
        "modelserve_inference_rows_total",
        "modelserve_last_inference_timestamp_seconds",
    }
)
_SHADOW_SAMPLES = frozenset(
    {
        "modelserve_shadow_requests_total",
        "modelserve_shadow_rows_total",
        "modelserve_shadow_difference_sum",
        "modelserve_shadow_difference_count",
        "modelserve_shadow_duration_seconds_sum",
    }
)
# (sample name, model, version) -> the value summed over every other label.
Totals = dict[tuple[str, str, str], float]
# (model, version, shadow version) -> (sample name and its outcome or labels label) -> value.
ShadowTotals = dict[tuple[str, str, str], dict[str, float]]


def read_totals(registry: CollectorRegistry) -> tuple[Totals, ShadowTotals]:
    totals: defaultdict[tuple[str, str, str], float] = defaultdict(float)
    shadows: defaultdict[tuple[str, str, str], defaultdict[str, float]] = defaultdict(
        lambda: defaultdict(float)
    )
    for metric in registry.collect():
        if not metric.name.startswith("modelserve_"):
            continue
        for sample in metric.samples:
            name, labels = sample.name, sample.labels
            if name in _SHADOW_SAMPLES:
                pair = (labels["model"], labels["version"], labels["shadow_version"])
                which = labels.get("outcome") or labels.get("labels") or ""
                shadows[pair][f"{name}:{which}"] += sample.value
                continue
            if name not in _SAMPLES or "model" not in labels or "version" not in labels:
                continue
            if name == "modelserve_requests_total":
                if labels.get("code", "").startswith("2"):
                    continue  # successes are counted, with their time, by the histogram
                name = _FAILED
            totals[(name, labels["model"], labels["version"])] += sample.value
    return totals, {pair: dict(values) for pair, values in shadows.items()}


def _shadow_statistics(shadow_version: str, values: dict[str, float]) -> ShadowStatistics:
    def value(key: str) -> float:
        return values.get(key, 0.0)

    same = value("modelserve_shadow_rows_total:same")
    rows = same + value("modelserve_shadow_rows_total:different")
    differences = value("modelserve_shadow_difference_count:")
    return ShadowStatistics(
        shadow_version=shadow_version,
        compared=round(value("modelserve_shadow_requests_total:compared")),
        dropped=round(value("modelserve_shadow_requests_total:dropped")),
        failed=round(value("modelserve_shadow_requests_total:failed")),
        label_agreement=same / rows if rows else None,
        mean_largest_difference=(
            value("modelserve_shadow_difference_sum:") / differences if differences else None
        ),
        shadow_ns=round(value("modelserve_shadow_duration_seconds_sum:") * 1e9),
    )


def version_statistics(
    totals: Totals, shadows: ShadowTotals, name: str, version: str
) -> ModelStatistics:
    def total(sample: str) -> float:
        return totals.get((sample, name, version), 0.0)

    def duration(histogram: str) -> StatisticDuration:
        return StatisticDuration(
            count=round(total(f"{histogram}_count")), ns=round(total(f"{histogram}_sum") * 1e9)
        )

    return ModelStatistics(
        name=name,
        version=version,
        last_inference=round(total("modelserve_last_inference_timestamp_seconds") * 1000),
        inference_count=round(total("modelserve_inference_rows_total")),
        execution_count=round(total("modelserve_compute_duration_seconds_count")),
        inference_stats=InferStatistics(
            success=duration("modelserve_request_duration_seconds"),
            fail=StatisticDuration(count=round(total(_FAILED))),
            queue=duration("modelserve_queue_duration_seconds"),
            compute_input=StatisticDuration(),
            compute_infer=duration("modelserve_compute_duration_seconds"),
            compute_output=StatisticDuration(),
        ),
        shadow=[
            _shadow_statistics(shadow_version, values)
            for (model, primary, shadow_version), values in sorted(shadows.items())
            if (model, primary) == (name, version)
        ],
    )


def model_statistics(
    registry: CollectorRegistry, versions: Iterable[tuple[str, int]]
) -> InferenceStatistics:
    """Statistics of the given (model, version) pairs, in that order."""
    totals, shadows = read_totals(registry)
    return InferenceStatistics(
        model_stats=[
            version_statistics(totals, shadows, name, str(number)) for name, number in versions
        ]
    )
