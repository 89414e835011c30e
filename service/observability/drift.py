"""Live drift: each version's recent rows binned on its reference profile's edges, and their PSI.

A small batch is copied to a buffer, binned with the rows gathered there once it fills, at a
scrape or within a second (`keep_fresh`): a single row costs little more than the copy. A batch
is binned in a few array operations whatever the number of features: a value's bin is how many
of its feature's edges are at or below it, and one `np.bincount` counts the bins of every
feature (or, for a large batch, one pass per edge counts the values that reach it). Past
SAMPLED_ROWS rows, a batch's bins are counted on an even sample of its rows, so that a
10,000-row request does not pay for its drift what it pays for its model call; its missing and
out-of-range values are still counted exactly. The window is a ring of BLOCKS blocks of counts;
the oldest block leaves as a new one fills, so the window holds the last `window_rows` rows,
give or take a block. With `window_s` set, a block also closes when it is a tenth of that old
and leaves once its last row is older than `window_s`: the window then holds whichever is fewer,
the last `window_rows` rows or the rows of the last `window_s` seconds. Each worker keeps its
own.
"""

import asyncio
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
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
# How often a worker bins its pending rows and brings its gauges up to its windows (and at
# every scrape it answers), so a worker that falls idle still reports the rows it saw.
REFRESH_S = 1.0
# Rows gathered before binning; up to this many rows are compared with all edges at once.
PENDING_ROWS = 256
BROADCAST_ROWS = 256
# A batch's bins are counted on at most about this many of its rows, evenly spread: the cost
# of drift stops growing with the batch, and the shares of 1,000 rows are within a few points.
SAMPLED_ROWS = 1024


def _float32_at_or_above(values: NDArray[np.float64]) -> NDArray[np.float32]:
    """The least float32 at or above each value (NaN stays NaN, beyond range infinity)."""
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float32)
    below = rounded < values
    rounded[below] = np.nextafter(rounded[below], np.float32(np.inf))
    return rounded


class Window:
    """A version's drift counts over its recent rows, one block at a time."""

    def __init__(
        self,
        profile: Profile,
        max_features: int,
        window_rows: int,
        window_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.profile = profile
        self.features = profile.features[:max_features]
        count = len(self.features)
        width = max((len(f.edges) for f in self.features), default=0)
        # Padded with +inf, which no finite value reaches: the padded bins stay empty.
        self.edges = np.full((count, width), np.inf)
        for i, feature in enumerate(self.features):
            self.edges[i, : len(feature.edges)] = feature.edges
        self.edges_by_column = self.edges.T[:, :, None].copy()  # edge k of every feature
        self.low = np.array([np.nan if f.min is None else f.min for f in self.features])
        self.high = np.array([np.nan if f.max is None else f.max for f in self.features])
        self.low_column, self.high_column = self.low[:, None], self.high[:, None]
        # The same bounds for float32 values, compared without converting them: a float32 is
        # at or above a bound exactly when it is at or above the least float32 at or above it.
        self.float32_bounds = (
            _float32_at_or_above(self.edges_by_column),
            _float32_at_or_above(self.low),
            -_float32_at_or_above(-self.high),
        )
        self.missing_slot = width + 1
        self.slots = width + 2  # per feature: its bins, then missing values
        self.offsets = np.arange(count) * self.slots
        prediction = profile.prediction
        self.classes = prediction.classes if prediction else None
        self.prediction_edges = np.asarray(prediction.edges if prediction else [], dtype=np.float64)
        # Its bins or classes, then one for what fits none (an unknown label, NaN).
        prediction_slots = len(prediction.shares) + 1 if prediction else 0
        self.prediction_at = count * self.slots
        self.out_of_range_at = self.prediction_at + prediction_slots
        self.size = self.out_of_range_at + count
        self.limit = window_rows
        self.block_rows = max(1, window_rows // BLOCKS)
        self.window_s = window_s or math.inf
        self.block_s = self.window_s / BLOCKS
        self.clock = clock
        # Closed blocks: counts, rows, and when the last of their rows was counted.
        self.blocks: deque[tuple[NDArray[np.int64], int, float]] = deque()
        self.current = np.zeros(self.size, dtype=np.int64)
        self.current_rows = 0
        self.current_started = self.current_last = clock()
        self.total = np.zeros(self.size, dtype=np.int64)
        self.rows = 0
        # Small batches wait here and are binned together: a single row costs a copy.
        self.pending_limit = min(PENDING_ROWS, self.block_rows)
        self.pending = np.empty((self.pending_limit, count), dtype=np.float64)
        self.pending_predicted = np.empty(self.pending_limit, dtype=np.float64)
        self.pending_rows = 0
        self.lock = threading.Lock()

    def record(self, matrix: NDArray[Any], prediction: Prediction) -> NDArray[np.int64] | None:
        """Count a batch: a large one at once, small ones once `pending_limit` rows gathered.

        Returns the counts binned by this call, if any, for the counters.
        """
        rows = len(matrix)
        values = matrix[:, : len(self.features)]
        if rows > self.pending_limit // 2:
            counts = self._bin(values, None)
            self._count_predictions(counts, prediction)
            with self.lock:
                binned = self._flush() if rows > self.pending_limit - self.pending_rows else None
                self._add(counts, rows)
            return counts if binned is None else counts + binned
        predicted = self._predicted(prediction)
        with self.lock:
            binned = self._flush() if rows > self.pending_limit - self.pending_rows else None
            start = self.pending_rows
            self.pending[start : start + rows] = values
            if predicted is not None:
                self.pending_predicted[start : start + rows] = predicted
            self.pending_rows = start + rows
            return binned

    def flush(self) -> NDArray[np.int64] | None:
        """Bin the rows still pending; their counts, if there were any."""
        with self.lock:
            return self._flush()

    def _flush(self) -> NDArray[np.int64] | None:
        rows = self.pending_rows
        if not rows:
            return None
        predicted = self.pending_predicted[:rows] if self.profile.prediction else None
        counts = self._bin(self.pending[:rows], predicted)
        self._add(counts, rows)
        self.pending_rows = 0
        return counts

    def _bin(self, values: NDArray[Any], predicted: NDArray[Any] | None) -> NDArray[np.int64]:
        """One batch's counts: bins and missing values per feature, predictions, out of range."""
        if len(values) > BROADCAST_ROWS:
            counts = self._bin_large(values)
        else:  # every row, feature and edge compared at once, one bincount for every bin
            bins = (values[:, :, None] >= self.edges).sum(axis=2)
            missing = np.isnan(values)
            if missing.any():
                bins[missing] = self.missing_slot
            counts = np.bincount((bins + self.offsets).ravel(), minlength=self.size)
            outside = (values < self.low) | (values > self.high)
            counts[self.out_of_range_at :] = np.count_nonzero(outside, axis=0)
        if predicted is not None:
            start, end = self.prediction_at, self.out_of_range_at
            slots = self._prediction_slots(predicted)
            counts[start:end] += np.bincount(slots, minlength=end - start)
        return counts

    def _count_predictions(self, counts: NDArray[np.int64], prediction: Prediction) -> None:
        """A batch's predictions added to its counts; classes given by position are counted
        once for this window and the label metrics alike."""
        start, end = self.prediction_at, self.out_of_range_at
        if self.classes and prediction.label_index is not None:
            per_class = prediction.class_counts(len(self.classes))
            if len(per_class) <= end - start:  # else a position past the profile's classes
                counts[start : start + len(per_class)] += per_class
                return
        predicted = self._predicted(prediction)
        if predicted is not None:
            slots = self._prediction_slots(predicted)
            counts[start:end] += np.bincount(slots, minlength=end - start)

    def _bin_large(self, values: NDArray[Any]) -> NDArray[np.int64]:
        """The same counts, one pass per edge along each feature's values (features by rows):
        a bin's count is how many values reach its lower edge less how many reach its upper.

        Past SAMPLED_ROWS rows the bins are counted on every step-th row, each counting for the
        rows it stands for; missing and out-of-range values are always counted exactly, the
        usual answer (none) found from each feature's minimum and maximum.
        """
        columns = np.ascontiguousarray(values.T)
        if columns.dtype == np.float32:
            edges, low, high = self.float32_bounds
        else:
            columns = columns.astype(np.float64)
            edges, low, high = self.edges_by_column, self.low, self.high
        features, rows = columns.shape
        counts = np.zeros(self.size, dtype=np.int64)
        per_feature = counts[: self.prediction_at].reshape(features, self.slots)
        # NaN fails both comparisons: a feature with a missing value is counted too. The
        # minimum and maximum are NaN when a value is, and else say which sides need counting.
        least, most = columns.min(axis=1), columns.max(axis=1)
        clean = (least >= low) & (most <= high)
        missing = False
        for i in np.flatnonzero(~clean).tolist():
            column, at_least, at_most = columns[i], least[i], most[i]
            gaps = np.isnan(at_least)
            if gaps:
                per_feature[i, self.missing_slot] = np.count_nonzero(np.isnan(column))
                missing = True
            below = np.count_nonzero(column < low[i]) if gaps or at_least < low[i] else 0
            above = np.count_nonzero(column > high[i]) if gaps or at_most > high[i] else 0
            counts[self.out_of_range_at + i] = below + above
        step = -(-rows // SAMPLED_ROWS)
        sample = np.ascontiguousarray(columns[:, ::step])
        reached = np.zeros((self.slots, features), dtype=np.int64)
        reached[0] = sample.shape[1]
        if missing:
            reached[0] -= np.count_nonzero(np.isnan(sample), axis=1)  # NaN reaches no edge
        # Summed as bytes into uint16 (a sample has at most SAMPLED_ROWS values): a third
        # cheaper than summing booleans into int64.
        at_or_above = (sample >= edges).view(np.uint8)
        reached[1 : self.missing_slot] = at_or_above.sum(axis=2, dtype=np.uint16)
        bins = (reached[:-1] - reached[1:]).T
        if step > 1:
            bins = np.rint(bins * (rows / sample.shape[1])).astype(np.int64)
        per_feature[:, : self.missing_slot] = bins
        return counts

    def _predicted(self, prediction: Prediction) -> NDArray[Any] | None:
        """What the window keeps of a prediction: class positions, or predicted values."""
        if self.classes:
            if prediction.label_index is not None:
                return prediction.label_index.reshape(-1)
            return class_indices(self.classes, prediction_column(prediction.outputs))
        if self.profile.prediction is not None:
            values = prediction_column(prediction.outputs)
            if values.dtype.kind in "fiu":
                return values
            return np.full(len(values), np.nan)
        return None

    def _prediction_slots(self, predicted: NDArray[np.float64]) -> NDArray[np.intp]:
        if self.classes:
            return predicted.astype(np.intp, copy=False)
        # Values that are not numbers count in no bin: past the last one, where nothing reads.
        slots = bin_index(self.prediction_edges, predicted)
        return np.where(np.isnan(predicted), len(self.prediction_edges) + 1, slots)

    def _add(self, counts: NDArray[np.int64], rows: int) -> None:
        now = self.clock()
        if self.current_rows and now - self.current_started >= self.block_s:
            self._close_block()
        if not self.current_rows:
            self.current_started = now
        self.current += counts
        self.total += counts
        self.current_rows += rows
        self.rows += rows
        self.current_last = now
        if self.current_rows >= self.block_rows:
            self._close_block()
        self._expire(now)

    def _close_block(self) -> None:
        self.blocks.append((self.current, self.current_rows, self.current_last))
        self.current = np.zeros(self.size, dtype=np.int64)
        self.current_rows = 0
        if len(self.blocks) >= BLOCKS:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        oldest, oldest_rows, _ = self.blocks.popleft()
        self.total -= oldest
        self.rows -= oldest_rows

    def _expire(self, now: float) -> None:
        """Drop the rows older than `window_s` (whole blocks; the one filling closes first)."""
        if self.window_s == math.inf:
            return
        if self.current_rows and now - self.current_started >= self.block_s:
            self._close_block()
        oldest = now - self.window_s
        while self.blocks and self.blocks[0][2] < oldest:
            self._drop_oldest()

    def report(self, name: str, version: int) -> VersionDrift:
        with self.lock:
            self._expire(self.clock())
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
        self,
        model: ModelVersion,
        profile: Profile,
        metrics: Metrics,
        rows: int,
        features: int,
        seconds: float = 0.0,
    ) -> None:
        self.model = model
        self.window = Window(profile, features, rows, seconds)
        labels = (model.name, str(model.version))
        names = [f.name for f in self.window.features]
        self._psi = [metrics.feature_psi.labels(*labels, n) for n in names]
        self._prediction_psi = metrics.prediction_psi.labels(*labels)
        self._out_of_range = [metrics.feature_out_of_range.labels(*labels, n) for n in names]
        self._missing = [metrics.feature_missing.labels(*labels, n) for n in names]

    def observe(self, matrix: NDArray[Any], prediction: Prediction) -> None:
        binned = self.window.record(matrix, prediction)
        if binned is not None:
            self._count(binned)

    def _count(self, binned: NDArray[np.int64]) -> None:
        window = self.window
        # As lists: a few features' counts, where numpy's per-call cost would be most of it.
        outside = binned[window.out_of_range_at :].tolist()
        for counter, count in zip(self._out_of_range, outside, strict=True):
            if count:
                counter.inc(count)
        missing = binned[window.offsets + window.missing_slot].tolist()
        for counter, count in zip(self._missing, missing, strict=True):
            if count:
                counter.inc(count)

    def report(self) -> VersionDrift:
        binned = self.window.flush()
        if binned is not None:
            self._count(binned)
        return self.window.report(self.model.name, self.model.version)

    def refresh(self) -> None:
        report = self.report()
        for gauge, feature in zip(self._psi, report.features, strict=True):
            if feature.psi is not None:
                gauge.set(feature.psi)
        if report.prediction is not None and report.prediction.psi is not None:
            self._prediction_psi.set(report.prediction.psi)


class DriftWatch:
    """The drift windows of the versions that served rows in this worker."""

    def __init__(
        self, metrics: Metrics, window_rows: int, max_features: int, window_s: float = 0.0
    ) -> None:
        self._metrics = metrics
        self._rows = window_rows
        self._seconds = window_s
        self._features = max_features
        # None: the version has no usable profile, decided once per loaded version.
        self._watches: weakref.WeakKeyDictionary[ModelVersion, VersionWatch | None] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        # Batches counted on the loop once it has written the answers waiting on them.
        self._soon: list[tuple[ModelVersion, Arrays, Prediction]] = []

    def observe_soon(
        self,
        loop: asyncio.AbstractEventLoop,
        model: ModelVersion,
        inputs: Arrays,
        prediction: Prediction,
    ) -> None:
        """`observe`, at the loop's next turn: the request tasks running now write their
        answers first. Called on the loop; a report counts what waits here first."""
        soon = self._soon
        soon.append((model, inputs, prediction))
        if len(soon) == 1:
            loop.call_soon(self.observe_waiting)

    def observe_waiting(self) -> None:
        """Count the batches `observe_soon` left for the loop's next turn."""
        soon, self._soon = self._soon, []
        for model, inputs, prediction in soon:
            self.observe(model, inputs, prediction)

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
            watch = VersionWatch(
                model, profile, self._metrics, self._rows, self._features, self._seconds
            )
        with self._lock:
            self._watches[model] = watch
        return watch

    def report(self, model: ModelVersion) -> VersionDrift:
        self.observe_waiting()
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
        return watch.report()

    async def keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            self.refresh()

    def refresh(self) -> None:
        """Bin the pending rows and bring every gauge of this worker up to its windows."""
        self.observe_waiting()
        with self._lock:
            watches = [w for w in self._watches.values() if w is not None]
        for watch in watches:
            watch.refresh()
