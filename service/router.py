"""Routes a request to its model version and through that version's batcher."""

import weakref
from concurrent.futures import Executor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.batching import Batcher, Prediction, predict_unbatched
from service.metrics import Metrics
from service.registry import ModelVersion, Registry
from service.signature import conform


class _VersionObserver:
    """Feeds one version's batcher events into the metrics, with labels bound once."""

    def __init__(self, metrics: Metrics, model: ModelVersion) -> None:
        labels = (model.name, str(model.version))
        self._batch_rows = metrics.batch_rows.labels(*labels)
        self._compute = metrics.compute_duration.labels(*labels)
        self._depth = metrics.queue_depth.labels(*labels)

    def call_done(self, rows: int, seconds: float) -> None:
        self._batch_rows.observe(rows)
        self._compute.observe(seconds)

    def queue_changed(self, depth: int) -> None:
        self._depth.set(depth)


class Router:
    """The registry in force (swapped whole on reload) and a batcher per loaded version."""

    def __init__(
        self, registry: Registry, executor: Executor, metrics: Metrics, max_rows: int
    ) -> None:
        self.registry = registry
        self.max_rows = max_rows
        self._executor = executor
        self._metrics = metrics
        self._batchers: weakref.WeakKeyDictionary[ModelVersion, Batcher] = (
            weakref.WeakKeyDictionary()
        )

    def resolve(self, name: str, version: str | None) -> ModelVersion:
        return self.registry.resolve(name, version)

    def _batcher(self, model: ModelVersion) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = Batcher(
                model.runtime.predict,
                self._executor,
                model.max_batch_rows,
                model.max_delay_ms,
                _VersionObserver(self._metrics, model),
            )
            self._batchers[model] = batcher
        return batcher

    async def predict(self, model: ModelVersion, tensors: dict[str, NDArray[Any]]) -> Prediction:
        """Check the tensors against the signature, run them, and count what came out."""
        inputs = conform(model, tensors, self.max_rows)
        rows = len(next(iter(inputs.values())))
        if model.batchable:
            prediction = await self._batcher(model).submit(inputs, rows)
        else:
            prediction = await predict_unbatched(model.runtime.predict, self._executor, inputs)
            self._metrics.batch_rows.labels(model.name, str(model.version)).observe(rows)
            self._metrics.compute_duration.labels(model.name, str(model.version)).observe(
                prediction.compute_seconds
            )
        self._record(model, rows, prediction)
        return prediction

    def _record(self, model: ModelVersion, rows: int, prediction: Prediction) -> None:
        labels = (model.name, str(model.version))
        self._metrics.inference_rows.labels(*labels).inc(rows)
        self._metrics.queue_duration.labels(*labels).observe(prediction.queue_seconds)
        label = prediction.outputs.get("label")
        if label is not None and model.signature.task == "classification":
            values, counts = np.unique(label, return_counts=True)
            for value, count in zip(values.tolist(), counts.tolist(), strict=True):
                self._metrics.predictions.labels(*labels, str(value)).inc(count)
