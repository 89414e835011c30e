"""Routes a request to its model version and through that version's batcher."""

import asyncio
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import Overloaded
from service.observability.drift import DriftWatch
from service.observability.metrics import Metrics, adder, observing
from service.observability.payloads import PayloadLog
from service.prediction.batching import INLINE_CALL_S, Batcher, Timed, predict_unbatched
from service.prediction.shadow import Shadows
from service.prediction.signature import conform
from service.store.registry import ModelVersion, Registry
from service.store.runtimes import Arrays, Prediction


class _VersionObserver:
    """Feeds one version's batcher events into the metrics, with labels bound once."""

    def __init__(self, metrics: Metrics, model: ModelVersion) -> None:
        labels = (model.name, str(model.version))
        self._batch_rows = observing(metrics.batch_rows.labels(*labels))
        self._compute = observing(metrics.compute_duration.labels(*labels))
        self._depth = metrics.queue_depth.labels(*labels)
        self._last = metrics.last_inference.labels(*labels)
        self.rows = adder(metrics.inference_rows.labels(*labels))
        self.queue = observing(metrics.queue_duration.labels(*labels))
        self._predictions = metrics.predictions
        self._label_children: dict[str, Callable[[float], None]] = {}
        self._labels = labels
        self._known = model.labels
        # Sorted, as searchsorted needs; None when labels must be counted the slow way.
        self._classes = np.sort(np.asarray(model.signature.classes)) if self._known else None

    def call_done(self, rows: int, seconds: float) -> None:
        self._batch_rows(rows)
        self._compute(seconds)
        self._last.set(time.time())

    def queue_changed(self, depth: int) -> None:
        self._depth.set(depth)

    def _label_child(self, value: Any) -> Callable[[float], None]:
        text = str(value)
        child = self._label_children.get(text)
        if child is None:
            child = adder(self._predictions.labels(*self._labels, text))
            if len(self._label_children) < 1024:  # a regressor's outputs are not class labels
                self._label_children[text] = child
        return child

    def count_labels(self, label: NDArray[Any], prediction: Prediction) -> None:
        if label.size == 1:
            self._label_child(label.reshape(-1)[0])(1)
            return
        if prediction.label_index is not None and self._known is not None:
            counts = self._known.counts(prediction.class_counts(len(self._known.names)))
        else:
            counts = _label_counts(label, self._classes)
        for value, count in counts:
            self._label_child(value)(count)


def _label_counts(label: NDArray[Any], classes: NDArray[Any] | None) -> list[tuple[Any, int]]:
    """How often each label occurs: a lookup among the known classes, else a sort."""
    flat = label.reshape(-1)
    if classes is not None and flat.dtype.kind == classes.dtype.kind and flat.dtype.kind in "Uiu":
        index = np.searchsorted(classes, flat).clip(0, len(classes) - 1)
        if (classes[index] == flat).all():
            counts = np.bincount(index, minlength=len(classes)).tolist()
            return [(c, n) for c, n in zip(classes.tolist(), counts, strict=True) if n]
    values, counts = np.unique(flat, return_counts=True)
    return list(zip(values.tolist(), counts.tolist(), strict=True))


class Router:
    """The registry in force (swapped whole on reload) and a batcher per loaded version."""

    def __init__(
        self,
        registry: Registry,
        executor: Executor,
        metrics: Metrics,
        max_rows: int,
        max_queue: int | None = None,
        shadow_max_pending: int = 8,
        drift: DriftWatch | None = None,
        payloads: PayloadLog | None = None,
        inline_call_s: float = INLINE_CALL_S,
    ) -> None:
        self.registry = registry
        self.inline_call_s = inline_call_s
        self.drift = drift
        self.payloads = payloads
        self._shadows = Shadows(metrics, self._shadow_call, shadow_max_pending)
        self.max_rows = max_rows
        self.max_queue = max_queue
        self._executor = executor
        self._metrics = metrics
        self._batchers: weakref.WeakKeyDictionary[ModelVersion, Batcher] = (
            weakref.WeakKeyDictionary()
        )
        self._observers: weakref.WeakKeyDictionary[ModelVersion, _VersionObserver] = (
            weakref.WeakKeyDictionary()
        )
        self._unbatched: weakref.WeakKeyDictionary[ModelVersion, int] = weakref.WeakKeyDictionary()

    def resolve(
        self, name: str, version: str | None, routing_key: str | None = None
    ) -> ModelVersion:
        return self.registry.resolve(name, version, routing_key)

    def _observer(self, model: ModelVersion) -> _VersionObserver:
        observer = self._observers.get(model)
        if observer is None:
            observer = self._observers[model] = _VersionObserver(self._metrics, model)
        return observer

    def _batcher(self, model: ModelVersion) -> Batcher:
        batcher = self._batchers.get(model)
        if batcher is None:
            batcher = Batcher(
                self._predictor(model, asyncio.get_running_loop()),
                self._executor,
                model.max_batch_rows,
                model.max_delay_ms,
                self._observer(model),
                self.max_queue,
                self.inline_call_s,
            )
            self._batchers[model] = batcher
        return batcher

    async def _predict_alone(self, model: ModelVersion, inputs: Arrays) -> Timed:
        """Unbatched calls, bounded like a batcher's queue: at most `max_queue` per version."""
        pending = self._unbatched.get(model, 0)
        if self.max_queue is not None and pending >= self.max_queue:
            raise Overloaded(f"{pending} requests are already pending for this model version")
        self._unbatched[model] = pending + 1
        try:
            return await predict_unbatched(self._predictor(model), self._executor, inputs)
        finally:
            self._unbatched[model] -= 1

    def _predictor(
        self, model: ModelVersion, loop: asyncio.AbstractEventLoop | None = None
    ) -> Callable[[Arrays], Prediction]:
        """The version's model call, its rows and prediction counted in the drift window once
        per call (a batch of requests, mirrored ones included), not once per request.

        A call made on `loop` (inline) is counted once the loop has written the answers that
        wait on it: the client does not wait for its monitoring. A call in a thread is counted
        there, beside the loop.
        """
        predict, drift = model.runtime.predict, self.drift
        if drift is None:
            return predict
        loop_thread = threading.get_ident() if loop is not None else None

        def predict_and_watch(inputs: Arrays) -> Prediction:
            prediction = predict(inputs)
            if threading.get_ident() == loop_thread and loop is not None and not loop.is_closed():
                drift.observe_soon(loop, model, inputs, prediction)
            else:
                drift.observe(model, inputs, prediction)
            return prediction

        return predict_and_watch

    async def predict(
        self,
        model: ModelVersion,
        tensors: dict[str, NDArray[Any]],
        request_id: str | None = None,
    ) -> Prediction:
        """Check the tensors against the signature, run them, and count what came out.

        A request's `request_id` makes it a candidate for the payload log (a chunk of a file
        being scored has none: files are not logged).
        """
        inputs = conform(model, tensors, self.max_rows)
        del tensors  # decoded in another dtype, the request's arrays are garbage from here
        rows = len(next(iter(inputs.values())))
        observer = self._observer(model)
        timed = await self._run(model, inputs, rows)
        observer.rows(rows)
        observer.queue(timed.queue_seconds)
        prediction = timed.prediction
        label = prediction.outputs.get("label")
        if label is not None and model.signature.task == "classification":
            if rows == 1:
                observer.count_labels(label, prediction)
            else:  # a pass over the labels: counted once the answer has gone
                asyncio.get_running_loop().call_soon(observer.count_labels, label, prediction)
        entry = self.registry.models.get(model.name)
        self._shadows.mirror(entry, model, inputs, rows, prediction)
        if self.payloads is not None and request_id is not None:
            self.payloads.offer(entry, model, request_id, inputs, prediction.outputs)
        return prediction

    async def _run(self, model: ModelVersion, inputs: Arrays, rows: int) -> Timed:
        """One request's call: through the version's batcher, or alone when it cannot batch."""
        if model.batchable:
            return await self._batcher(model).submit(inputs, rows)
        timed = await self._predict_alone(model, inputs)
        self._observer(model).call_done(rows, timed.compute_seconds)
        return timed

    async def _shadow_call(self, model: ModelVersion, inputs: Arrays, rows: int) -> Prediction:
        return (await self._run(model, inputs, rows)).prediction
