"""Live drift windows: counts and PSI by hand, the sliding window, the metrics it feeds."""

import asyncio
import contextlib
import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.errors import ModelNotFound
from service.observability.drift import BLOCKS, REFRESH_S, SAMPLED_ROWS, DriftWatch, Window
from service.observability.metrics import create_metrics
from service.prediction.batching import ONE_CORE_INLINE_CALL_S
from service.prediction.router import Router
from service.store.profiles import FeatureProfile, PredictionProfile, Profile
from service.store.registry import LoadOptions, ModelVersion, Registry, load_version
from service.store.runtimes import Prediction
from tests.test_profiles import iris_training_rows

NO_OUTPUTS = Prediction({})


def one_feature_profile() -> Profile:
    feature = FeatureProfile(name="x", edges=[1.0, 2.0], shares=[0.25, 0.5, 0.25], min=0.0, max=3.0)
    return Profile(rows=4, features=[feature])


def test_a_batch_is_binned_counted_and_compared_by_hand() -> None:
    window = Window(one_feature_profile(), max_features=50, window_rows=100)
    batch = np.array([[0.5], [1.5], [1.5], [2.5], [5.0], [np.nan]], dtype=np.float32)
    window.record(batch, NO_OUTPUTS)
    window.flush()
    feature = window.report("m", 1).features[0]
    # Five present values: 0.5 | 1.5 1.5 | 2.5 5.0 ; 5.0 is above the max; one is missing.
    assert feature.live_shares == pytest.approx([0.2, 0.4, 0.4])
    assert (feature.out_of_range, feature.missing) == (1, 1)
    by_hand = sum(
        (live - ref) * math.log(live / ref) for live, ref in [(0.2, 0.25), (0.4, 0.5), (0.4, 0.25)]
    )
    assert feature.psi == pytest.approx(by_hand)


def test_a_large_batch_is_counted_as_its_rows_one_by_one(iris_v1: ModelVersion) -> None:
    rows = np.random.default_rng(0).normal(4.0, 2.0, size=(1000, 4)).astype(np.float32)
    rows[::7, 1] = np.nan
    prediction = Prediction({}, np.arange(1000, dtype=np.intp) % 3)
    profile = iris_v1.profile
    assert profile is not None
    at_once = Window(profile, max_features=50, window_rows=10_000)
    one_by_one = Window(profile, max_features=50, window_rows=10_000)
    at_once.record(rows, prediction)
    for i in range(len(rows)):
        one_by_one.record(rows[i : i + 1], prediction.rows(i, i + 1))
    one_by_one.flush()
    assert at_once.report("iris", 1) == one_by_one.report("iris", 1)
    assert at_once.report("iris", 1).features[1].missing == 143


def test_a_batch_past_the_sample_is_binned_on_a_sample_and_counts_the_rest_exactly(
    iris_v1: ModelVersion,
) -> None:
    rng = np.random.default_rng(1)
    rows = rng.normal(4.0, 2.0, size=(10_000, 4)).astype(np.float32)
    rows[::7, 1] = np.nan
    rows[::13, 3] = 40.0  # beyond the training range
    prediction = Prediction({}, np.arange(10_000, dtype=np.intp) % 3)
    profile = iris_v1.profile
    assert profile is not None
    at_once = Window(profile, max_features=50, window_rows=10_000)
    exact = Window(profile, max_features=50, window_rows=10_000)
    at_once.record(rows, prediction)
    for start in range(0, len(rows), SAMPLED_ROWS):
        stop = start + SAMPLED_ROWS
        exact.record(rows[start:stop], prediction.rows(start, stop))
    sampled, counted = at_once.report("iris", 1), exact.report("iris", 1)
    assert sampled.window_rows == counted.window_rows == 10_000
    assert sampled.prediction == counted.prediction
    for estimate, truth in zip(sampled.features, counted.features, strict=True):
        assert (estimate.missing, estimate.out_of_range) == (truth.missing, truth.out_of_range)
        np.testing.assert_allclose(estimate.live_shares, truth.live_shares, atol=0.03)
    assert sampled.features[1].missing == 1_429
    assert sampled.features[3].out_of_range >= 770


def test_float32_rows_fall_in_the_bins_their_float64_values_fall_in() -> None:
    """Float32 batches are compared with float32 bounds; a value next to an edge that float32
    cannot hold (0.1, 0.2, 0.3) lands on the same side as in float64."""
    feature = FeatureProfile(name="x", edges=[0.1, 0.2], shares=[0.3, 0.4, 0.3], min=0.1, max=0.3)
    profile = Profile(rows=10, features=[feature])
    near = []
    for bound in (0.1, 0.2, 0.3):
        value = np.float32(bound)
        near += [np.nextafter(value, np.float32(-1)), value, np.nextafter(value, np.float32(1))]
    rows = np.resize(np.asarray(near, dtype=np.float32), (3 * SAMPLED_ROWS, 1))
    single, double = (Window(profile, max_features=50, window_rows=100_000) for _ in range(2))
    single.record(rows, NO_OUTPUTS)
    double.record(rows.astype(np.float64), NO_OUTPUTS)
    assert single.report("m", 1) == double.report("m", 1)
    # Out of range: the float32 below 0.1, and float32(0.3), above 0.3, and the one after it.
    assert single.report("m", 1).features[0].out_of_range == len(rows) // 3


def test_the_window_forgets_the_oldest_rows() -> None:
    window = Window(one_feature_profile(), max_features=50, window_rows=100)
    low = np.full((10, 1), 0.5, dtype=np.float32)
    high = np.full((10, 1), 2.5, dtype=np.float32)
    for _ in range(BLOCKS):
        window.record(low, NO_OUTPUTS)
    window.flush()
    assert window.report("m", 1).features[0].live_shares == pytest.approx([1.0, 0.0, 0.0])
    for _ in range(BLOCKS):
        window.record(high, NO_OUTPUTS)
    window.flush()
    report = window.report("m", 1)
    assert report.window_rows <= 100
    assert report.features[0].live_shares == pytest.approx([0.0, 0.0, 1.0])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_time_window_forgets_rows_older_than_its_seconds() -> None:
    clock = Clock()
    window = Window(
        one_feature_profile(), max_features=50, window_rows=10_000, window_s=60.0, clock=clock
    )
    low = np.full((200, 1), 0.5, dtype=np.float32)
    high = np.full((200, 1), 2.5, dtype=np.float32)
    window.record(low, NO_OUTPUTS)
    clock.now += 30
    window.record(high, NO_OUTPUTS)
    report = window.report("m", 1)
    assert report.window_rows == 400
    assert report.features[0].live_shares == pytest.approx([0.5, 0.0, 0.5])
    # 61 s after the low rows, 31 s after the high ones: only the high rows are left.
    clock.now += 31
    report = window.report("m", 1)
    assert report.window_rows == 200
    assert report.features[0].live_shares == pytest.approx([0.0, 0.0, 1.0])
    # An idle minute empties it: nothing is measured rather than stale rows.
    clock.now += 60
    report = window.report("m", 1)
    assert report.window_rows == 0
    assert report.features[0].psi is None


def test_a_time_window_still_keeps_no_more_than_its_rows() -> None:
    clock = Clock()
    window = Window(one_feature_profile(), 50, window_rows=100, window_s=3600.0, clock=clock)
    for _ in range(3 * BLOCKS):
        window.record(np.full((10, 1), 0.5, dtype=np.float32), NO_OUTPUTS)
        clock.now += 1
    window.flush()
    assert 90 <= window.report("m", 1).window_rows <= 100


@pytest.fixture
def iris_v1(iris_repository: Path) -> ModelVersion:
    return load_version("iris", 1, iris_repository / "iris" / "1", LoadOptions(), (0, 0.0))


def test_training_rows_show_no_drift_and_a_shift_shows_in_that_feature(
    iris_v1: ModelVersion,
) -> None:
    registry = CollectorRegistry()
    watch = DriftWatch(create_metrics(registry), window_rows=10_000, max_features=50)
    rows = iris_training_rows()
    watch.observe(iris_v1, {"input": rows}, iris_v1.runtime.predict({"input": rows}))
    report = watch.report(iris_v1)
    assert report.window_rows == 112
    assert all(f.psi == pytest.approx(0.0, abs=1e-9) for f in report.features)
    assert report.prediction is not None
    assert report.prediction.psi == pytest.approx(0.0, abs=1e-9)

    fresh = DriftWatch(create_metrics(registry := CollectorRegistry()), 10_000, 50)
    shifted = rows.copy()
    shifted[:, 2] += 3.0
    fresh.observe(iris_v1, {"input": shifted}, iris_v1.runtime.predict({"input": shifted}))
    by_name = {f.name: f for f in fresh.report(iris_v1).features}
    assert by_name["petal_length"].psi is not None
    assert by_name["petal_length"].psi > 0.25
    assert all(f.psi is not None and f.psi < 0.1 for n, f in by_name.items() if n != "petal_length")
    beyond = int((shifted[:, 2] > rows[:, 2].max()).sum())
    assert by_name["petal_length"].out_of_range == beyond > 0
    labels = {"model": "iris", "version": "1", "feature": "petal_length"}
    assert registry.get_sample_value("modelserve_feature_out_of_range_total", labels) == beyond
    fresh.refresh()
    psi = registry.get_sample_value("modelserve_feature_drift_psi", labels)
    assert psi == pytest.approx(by_name["petal_length"].psi)


def test_a_single_row_is_counted_like_any_batch(iris_v1: ModelVersion) -> None:
    registry = CollectorRegistry()
    watch = DriftWatch(create_metrics(registry), window_rows=10_000, max_features=50)
    row = iris_training_rows()[:1]
    prediction = iris_v1.runtime.predict({"input": row})
    watch.observe(iris_v1, {"input": row}, prediction)
    report = watch.report(iris_v1)
    assert report.window_rows == 1
    for i, feature in enumerate(report.features):
        assert sum(feature.live_shares) == pytest.approx(1.0)
        expected = int(np.searchsorted(feature.edges, row[0, i], side="right"))
        assert feature.live_shares[expected] == 1.0
    assert report.prediction is not None
    assert sum(report.prediction.live_shares) == 1.0


def test_series_are_capped_per_model(iris_v1: ModelVersion) -> None:
    registry = CollectorRegistry()
    watch = DriftWatch(create_metrics(registry), window_rows=10_000, max_features=2)
    rows = iris_training_rows()
    watch.observe(iris_v1, {"input": rows}, iris_v1.runtime.predict({"input": rows}))
    watch.refresh()
    assert [f.name for f in watch.report(iris_v1).features] == ["sepal_length", "sepal_width"]
    exported = {
        s.labels["feature"]
        for m in registry.collect()
        if m.name == "modelserve_feature_drift_psi"
        for s in m.samples
    }
    assert exported == {"sepal_length", "sepal_width"}


def test_a_version_without_a_profile_names_the_command_that_writes_one(
    iris_v1: ModelVersion,
) -> None:
    watch = DriftWatch(create_metrics(CollectorRegistry()), 10_000, 50)
    bare = dataclasses.replace(iris_v1, profile=None)
    with pytest.raises(ModelNotFound, match=r"no reference profile.*modelserve profile iris:1"):
        watch.report(bare)


def test_a_regressors_predictions_are_binned_on_its_prediction_edges() -> None:
    reference = PredictionProfile(edges=[10.0], shares=[0.5, 0.5], min=0.0, max=20.0)
    profile = one_feature_profile().model_copy(update={"prediction": reference})
    window = Window(profile, max_features=50, window_rows=100)
    values = np.array([1.0, 2.0, 3.0, 15.0], dtype=np.float32)
    window.record(np.ones((4, 1), np.float32), Prediction({"prediction": values}))
    window.flush()
    drift = window.report("reg", 1).prediction
    assert drift is not None
    assert drift.live_shares == pytest.approx([0.75, 0.25])
    by_hand = (0.75 - 0.5) * math.log(0.75 / 0.5) + (0.25 - 0.5) * math.log(0.25 / 0.5)
    assert drift.psi == pytest.approx(by_hand)


def test_rows_waiting_in_the_buffer_are_counted_within_a_second(iris_v1: ModelVersion) -> None:
    registry = CollectorRegistry()
    watch = DriftWatch(create_metrics(registry), window_rows=10_000, max_features=50)
    row = iris_training_rows()[:1].copy()
    row[0, 2] = 100.0
    watch.observe(iris_v1, {"input": row}, iris_v1.runtime.predict({"input": row}))
    labels = {"model": "iris", "version": "1", "feature": "petal_length"}
    assert registry.get_sample_value("modelserve_feature_out_of_range_total", labels) == 0

    async def idle() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.keep_fresh(), REFRESH_S * 1.5)

    asyncio.run(idle())
    assert registry.get_sample_value("modelserve_feature_out_of_range_total", labels) == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_of_range_values_on_one_side_only_are_counted_exactly(
    iris_v1: ModelVersion, dtype: type
) -> None:
    """A large batch counts a feature's values past its maximum (or below its minimum) as a
    row-by-row count does, whichever side they fall, with clean features beside them."""
    profile = iris_v1.profile
    assert profile is not None
    low = np.array([f.min for f in profile.features], dtype=np.float64)
    high = np.array([f.max for f in profile.features], dtype=np.float64)
    rng = np.random.default_rng(2)
    rows: np.ndarray = (low + (high - low) * rng.random((5_000, 4))).astype(dtype)
    rows[::11, 1] = high[1] + 1.0  # past the maximum only
    rows[::17, 2] = low[2] - 1.0  # below the minimum only
    prediction = Prediction({}, np.arange(5_000, dtype=np.intp) % 3)
    at_once = Window(profile, max_features=50, window_rows=10_000)
    exact = Window(profile, max_features=50, window_rows=10_000)
    at_once.record(rows, prediction)
    for start in range(0, len(rows), 100):
        exact.record(rows[start : start + 100], prediction.rows(start, start + 100))
    exact.flush()
    counted = [(f.out_of_range, f.missing) for f in exact.report("iris", 1).features]
    assert [(f.out_of_range, f.missing) for f in at_once.report("iris", 1).features] == counted
    assert counted == [(0, 0), (455, 0), (295, 0), (0, 0)]


def test_a_call_on_the_loop_is_counted_after_its_answer_and_before_any_report(
    iris_repository: Path,
) -> None:
    """A call the batcher makes on the event loop is counted at the loop's next turn, so the
    answer does not wait for it; a report in between counts it first. A call in a thread is
    counted there, before its answer."""
    model = load_version("iris", 1, iris_repository / "iris" / "1", LoadOptions(), (256, 0.0))
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    watch = DriftWatch(metrics, window_rows=10_000, max_features=50)
    router = Router(
        Registry(),
        ThreadPoolExecutor(2),
        metrics,
        max_rows=100_000,
        drift=watch,
        inline_call_s=ONE_CORE_INLINE_CALL_S,
    )
    rows = np.tile(iris_training_rows(), (10, 1))[:1_500]
    rows[:, 2] = 100.0  # every petal length out of range: counted as soon as observed
    labels = {"model": "iris", "version": "1", "feature": "petal_length"}

    def out_of_range() -> float | None:
        return registry.get_sample_value("modelserve_feature_out_of_range_total", labels)

    async def main() -> list[bool]:
        lagging = []
        for call in range(1, 6):
            await router.predict(model, {"input": rows})
            lagging.append(out_of_range() != call * len(rows))
            assert watch.report(model).window_rows == call * len(rows)
            assert out_of_range() == call * len(rows)
        return lagging

    lagging = asyncio.run(main())
    assert lagging[0] is False  # measured in a thread, counted there
    assert any(lagging[1:])  # then on the loop, counted after the answer
