"""Shadow traffic: a fraction of one version's requests mirrored to another, and compared.

The mirror runs after the primary has answered, as a task of its own, so a client never waits
for it. At most `max_pending` mirrored requests per version pair are in flight; more are
dropped and counted, so a slow shadow costs the primary nothing but the CPU it gets.
"""

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.observability.metrics import Metrics
from service.store.registry import ModelEntry, ModelVersion
from service.store.runtimes import Arrays, Prediction

logger = logging.getLogger(__name__)

Call = Callable[[ModelVersion, Arrays, int], Awaitable[Prediction]]


def _largest_difference(primary: Arrays, shadow: Arrays) -> float | None:
    """Classifiers: the largest absolute probability difference; regressors: relative."""
    if "probabilities" in primary and "probabilities" in shadow:
        a, b = primary["probabilities"], shadow["probabilities"]
        if a.shape == b.shape:
            return float(np.abs(a.astype(np.float64) - b).max(initial=0.0))
    if "prediction" in primary and "prediction" in shadow:
        a, b = primary["prediction"].astype(np.float64), shadow["prediction"].astype(np.float64)
        if a.shape == b.shape:
            scale = np.maximum(np.abs(a), 1e-12)
            return float((np.abs(a - b) / scale).max(initial=0.0))
    return None


def _labels_agreeing(primary: Arrays, shadow: Arrays) -> tuple[int, int] | None:
    a: NDArray[Any] | None = primary.get("label")
    b: NDArray[Any] | None = shadow.get("label")
    if a is None or b is None or a.shape != b.shape:
        return None
    same = int((a.astype(str) == b.astype(str)).sum())
    return same, a.size - same


class Shadows:
    """Mirrors requests to the shadow version a model's routing names."""

    def __init__(self, metrics: Metrics, call: Call, max_pending: int) -> None:
        self._metrics = metrics
        self._call = call
        self._max_pending = max_pending
        self._pending: dict[tuple[ModelVersion, ModelVersion], int] = {}
        self._agreement: dict[tuple[ModelVersion, ModelVersion], tuple[int, int]] = {}
        # The loop holds tasks weakly; these are kept until they finish.
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(
        self,
        entry: ModelEntry | None,
        primary: ModelVersion,
        inputs: Arrays,
        rows: int,
        answer: Prediction,
    ) -> None:
        config = entry.shadow if entry is not None else None
        if config is None or config.source != primary.version or entry is None:
            return
        target = entry.versions.get(config.target)
        if target is None or random.random() >= config.fraction:
            return
        pair = (primary, target)
        labels = (primary.name, str(primary.version), str(target.version))
        if self._pending.get(pair, 0) >= self._max_pending:
            self._metrics.shadow_requests.labels(*labels, "dropped").inc()
            return
        self._pending[pair] = self._pending.get(pair, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(pair, inputs, rows, answer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        pair: tuple[ModelVersion, ModelVersion],
        inputs: Arrays,
        rows: int,
        answer: Prediction,
    ) -> None:
        primary, target = pair
        labels = (primary.name, str(primary.version), str(target.version))
        started = time.perf_counter()
        try:
            shadow = await self._call(target, inputs, rows)
        except Exception as exc:  # the shadow boundary: its failures never reach a client
            logger.warning("shadow request to %s version %s failed: %s", *labels[::2], exc)
            self._metrics.shadow_requests.labels(*labels, "failed").inc()
            return
        finally:
            self._pending[pair] -= 1
            if not self._pending[pair]:
                del self._pending[pair]
        metrics = self._metrics
        metrics.shadow_duration.labels(*labels).observe(time.perf_counter() - started)
        metrics.shadow_requests.labels(*labels, "compared").inc()
        difference = _largest_difference(answer.outputs, shadow.outputs)
        if difference is not None:
            metrics.shadow_difference.labels(*labels).observe(difference)
        agreeing = _labels_agreeing(answer.outputs, shadow.outputs)
        if agreeing is not None:
            same, different = agreeing
            metrics.shadow_rows.labels(*labels, "same").inc(same)
            metrics.shadow_rows.labels(*labels, "different").inc(different)
            total_same, total = self._agreement.get(pair, (0, 0))
            total_same, total = total_same + same, total + same + different
            self._agreement[pair] = (total_same, total)
            metrics.shadow_agreement.labels(*labels).set(total_same / total if total else 1.0)
