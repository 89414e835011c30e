"""Live drift: each version's recent rows binned on its reference profile's edges, and their PSI.

Per batch the cost is a few array operations, whatever the number of features: every value is
compared with its feature's edges at once (a feature's bin is how many of its edges are at or
below the value), and one `np.bincount` counts the bins of every feature and of the predictions.
The window is a ring of BLOCKS blocks of counts; the oldest block leaves as a new one fills, so
the window holds the last `window_rows` rows, give or take a block. Each worker keeps its own.
"""

import threading
import time
import weakref
from collections import deque
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import ModelNotFound
from service.observability.metrics import Metrics
from service.protocols.schemas import FeatureDrift, PredictionDrift, VersionDrift
from service.store.profiles import Profile, bin_index, class_indices, prediction_column, psi
from service.store.registry import ModelVersion
from service.store.runtimes import Arrays, Prediction

BLOCKS = 10
# The PSI gauges follow the window at most this often per version (and at every scrape).
REFRESH_S = 1.0


class Window:
    """A version's drift counts over its recent rows, one block at a time."""

    def __init__(self, profile: Profile, max_features: int, window_rows: int) -> None:
        self.profile = profile
        self.features = profile.features[:max_features]
        count = len(self.features)
        width = max((len(f.edges) for f in self.features), default=0)
        # Padded with +inf, which no finite value reaches: the padded bins stay empty.
        self.edges = np.full((count, width), np.inf)
        for i, feature in enumerate(self.features):
            self.edges[i, : len(feature.edges)] = feature.edges
        self.low = np.array([np.nan if f.min is None else f.min for f in self.features])
        self.high = np.array([np.nan if f.max is None else f.max for f in self.features])
        self.missing_slot = width + 1
        self.slots = width + 2  # per feature: its bins, then missing values
        self.offsets = np.arange(count) * self.slots
        prediction = profile.prediction
        self.classes = prediction.classes if prediction else None
        self.prediction_edges = np.asarray(prediction.edges if prediction else [], dtype=np.float64)
        prediction_slots = 0
        if prediction is not None:
            prediction_slots = len(self.classes) + 1 if self.classes else len(prediction.shares)
        self.prediction_at = count * self.slots
        self.out_of_range_at = self.prediction_at + prediction_slots
        self.size = self.out_of_range_at + count
        self.limit = window_rows
        self.block_rows = max(1, window_rows // BLOCKS)
        self.blocks: deque[tuple[NDArray[np.int64], int]] = deque()
        self.current = np.zeros(self.size, dtype=np.int64)
        self.current_rows = 0
        self.total = np.zeros(self.size, dtype=np.int64)
        self.rows = 0
        self.lock = threading.Lock()

    def counts(
        self, matrix: NDArray[Any], prediction: Prediction
    ) -> tuple[NDArray[np.int64], NDArray[np.bool_], NDArray[np.bool_]]:
        """One batch's counts (bins, missing, predictions, out of range) and its masks."""
        values = matrix[:, : len(self.features)]
        with np.errstate(invalid="ignore"):
            bins = (values[:, :, None] >= self.edges).sum(axis=2)
            outside = (values < self.low) | (values > self.high)
        missing = np.isnan(values)
        if missing.any():
            bins[missing] = self.missing_slot
        index = (bins + self.offsets).ravel()
        predicted = self._prediction_slots(prediction)
        if predicted is not None:
            index = np.concatenate((index, predicted + self.prediction_at))
        counts = np.bincount(index, minlength=self.size)
        counts[self.out_of_range_at :] = outside.sum(axis=0)
        return counts, outside, missing

    def _prediction_slots(self, prediction: Prediction) -> NDArray[np.intp] | None:
        if self.classes:
            if prediction.label_index is not None:
                return prediction.label_index.reshape(-1)
            return class_indices(self.classes, prediction_column(prediction.outputs))
        if self.profile.prediction is not None:
            values = prediction_column(prediction.outputs)
            if values.dtype.kind in "fiu":
                return bin_index(self.prediction_edges, values)
        return None

    def add(self, counts: NDArray[np.int64], rows: int) -> None:
        with self.lock:
            self.current += counts
            self.total += counts
            self.current_rows += rows
            self.rows += rows
            if self.current_rows >= self.block_rows:
                self.blocks.append((self.current, self.current_rows))
                self.current = np.zeros(self.size, dtype=np.int64)
                self.current_rows = 0
                if len(self.blocks) >= BLOCKS:
                    oldest, oldest_rows = self.blocks.popleft()
                    self.total -= oldest
                    self.rows -= oldest_rows

    def report(self, name: str, version: int) -> VersionDrift:
        with self.lock:
            total = self.total.copy()
            rows = self.rows
        features = []
        for i, feature in enumerate(self.features):
            start = i * self.slots
            counts = total[start : start + len(feature.shares)]
            live = counts / counts.sum() if counts.sum() else np.zeros(len(counts))
            reference = np.asarray(feature.shares)
            features.append(
                FeatureDrift(
                    name=feature.name,
                    edges=feature.edges,
                    reference_shares=feature.shares,
                    live_shares=live.tolist(),
                    psi=psi(reference, live) if counts.sum() else None,
                    reference_min=feature.min,
                    reference_max=feature.max,
                    out_of_range=int(total[self.out_of_range_at + i]),
                    missing=int(total[start + self.missing_slot]),
                    reference_missing_share=feature.missing_share,
                )
            )
        return VersionDrift(
            name=name,
            version=str(version),
            window_rows=rows,
            window_limit=self.limit,
            reference_rows=self.profile.rows,
            features=features,
            prediction=self._prediction_report(total),
        )

    def _prediction_report(self, total: NDArray[np.int64]) -> PredictionDrift | None:
        reference = self.profile.prediction
        if reference is None:
            return None
        counts = total[self.prediction_at : self.prediction_at + len(reference.shares)]
        seen = counts.sum() + (
            total[self.prediction_at + len(reference.shares)] if self.classes else 0
        )
        live = counts / seen if seen else np.zeros(len(counts))
        return PredictionDrift(
            classes=reference.classes,
            edges=reference.edges,
            reference_shares=reference.shares,
            live_shares=live.tolist(),
            psi=psi(np.asarray(reference.shares), live) if seen else None,
        )


class VersionWatch:
    """One version's window, with its metric children bound once."""

    def __init__(
        self, model: ModelVersion, profile: Profile, metrics: Metrics, rows: int, features: int
    ) -> None:
        self.model = model
        self.window = Window(profile, features, rows)
        labels = (model.name, str(model.version))
        names = [f.name for f in self.window.features]
        self._psi = [metrics.feature_psi.labels(*labels, n) for n in names]
        self._prediction_psi = metrics.prediction_psi.labels(*labels)
        self._out_of_range = [metrics.feature_out_of_range.labels(*labels, n) for n in names]
        self._missing = [metrics.feature_missing.labels(*labels, n) for n in names]
        self._refreshed = 0.0

    def observe(self, matrix: NDArray[Any], prediction: Prediction) -> None:
        counts, outside, missing = self.window.counts(matrix, prediction)
        self.window.add(counts, len(matrix))
        if outside.any():
            for i in np.flatnonzero(outside.any(axis=0)):
                self._out_of_range[i].inc(int(outside[:, i].sum()))
        if missing.any():
            for i in np.flatnonzero(missing.any(axis=0)):
                self._missing[i].inc(int(missing[:, i].sum()))
        now = time.monotonic()
        if now - self._refreshed >= REFRESH_S:
            self._refreshed = now
            self.refresh()

    def refresh(self) -> None:
        report = self.window.report(self.model.name, self.model.version)
        for gauge, feature in zip(self._psi, report.features, strict=True):
            if feature.psi is not None:
                gauge.set(feature.psi)
        if report.prediction is not None and report.prediction.psi is not None:
            self._prediction_psi.set(report.prediction.psi)


class DriftWatch:
    """The drift windows of the versions that served rows in this worker."""

    def __init__(self, metrics: Metrics, window_rows: int, max_features: int) -> None:
        self._metrics = metrics
        self._rows = window_rows
        self._features = max_features
        # None: the version has no usable profile, decided once per loaded version.
        self._watches: weakref.WeakKeyDictionary[ModelVersion, VersionWatch | None] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def observe(self, model: ModelVersion, inputs: Arrays, prediction: Prediction) -> None:
        """Count one checked batch of rows and its prediction in the version's window."""
        watch = self._watches[model] if model in self._watches else self._watch(model)
        if watch is not None:
            watch.observe(next(iter(inputs.values())), prediction)

    def _watch(self, model: ModelVersion) -> VersionWatch | None:
        profile = model.profile
        inputs = model.signature.inputs
        watch = None
        if (
            profile is not None
            and len(inputs) == 1
            and len(inputs[0].shape) == 2
            and inputs[0].shape[1] == len(profile.features)
        ):
            watch = VersionWatch(model, profile, self._metrics, self._rows, self._features)
        with self._lock:
            self._watches[model] = watch
        return watch

    def report(self, model: ModelVersion) -> VersionDrift:
        if model.profile is None:
            raise ModelNotFound(
                f"model {model.name!r} version {model.version} has no reference profile, so its "
                f"drift is not measured; write one with `modelserve profile "
                f"{model.name}:{model.version} --data FILE` (CSV or Parquet training rows)"
            )
        watch = self._watches[model] if model in self._watches else self._watch(model)
        if watch is None:
            raise ModelNotFound(
                f"model {model.name!r} version {model.version}: its reference profile does not "
                "match its input (one matrix with a column per profiled feature)"
            )
        return watch.window.report(model.name, model.version)

    def refresh(self) -> None:
        """Bring every PSI gauge of this worker up to its window (before a scrape)."""
        with self._lock:
            watches = [w for w in self._watches.values() if w is not None]
        for watch in watches:
            watch.refresh()
