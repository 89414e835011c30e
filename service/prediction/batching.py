"""Dynamic batching per model version: merge requests that wait while the model is busy."""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import Overloaded, PredictionFailed
from service.store.runtimes import Arrays, Prediction

logger = logging.getLogger(__name__)

# A call that takes less CPU time than this runs on the event loop itself: handing it to a
# thread and back costs more CPU (a wake-up each way, the GIL passed twice) than such a call.
INLINE_CALL_S = 100e-6
# The same bound for a worker with one core: there a model thread cannot run beside the loop,
# so the hand-off buys no parallelism, only its cost (about 8% of a 10,000-row call of 0.4 ms).
# A request arriving meanwhile waits at most this long for the loop.
ONE_CORE_INLINE_CALL_S = 2e-3
# An inline call must also take less wall time than this many times its CPU bound: a call that
# waits (on threads of its own, on I/O) would stall every other request on the loop meanwhile.
INLINE_WALL_FACTOR = 4


def inline_call_bound(cores: int) -> float:
    """The CPU time under which a model call runs on the loop, for a worker with `cores`."""
    return ONE_CORE_INLINE_CALL_S if cores == 1 else INLINE_CALL_S


class BatchObserver(Protocol):
    def call_done(self, rows: int, seconds: float) -> None: ...

    def queue_changed(self, depth: int) -> None: ...


@dataclass(frozen=True)
class Timed:
    """One request's share of a model call: what it waited in the queue, what the call took."""

    prediction: Prediction
    queue_seconds: float
    compute_seconds: float


@dataclass
class _Waiting:
    inputs: Arrays
    rows: int
    future: "asyncio.Future[Timed]"
    enqueued: float


class Batcher:
    """Runs one model call at a time; what queues up meanwhile goes into the next call.

    A request that finds the model idle runs at once, so batching adds no latency at low
    load. A call takes whole requests up to `max_rows` rows (a larger request runs alone).
    At most `max_queue` requests wait; more are refused at once (Overloaded), so overload
    shows as fast 503s rather than as latency that grows without bound.
    """

    def __init__(
        self,
        predict: Callable[[Arrays], Prediction],
        executor: Executor,
        max_rows: int,
        max_delay_ms: float = 0.0,
        observer: BatchObserver | None = None,
        max_queue: int | None = None,
        inline_call_s: float = INLINE_CALL_S,
    ) -> None:
        self._predict = predict
        self._inline_call_s = inline_call_s
        self._inline_wall_s = INLINE_WALL_FACTOR * inline_call_s
        self._max_queue = max_queue
        self._executor = executor
        self._max_rows = max_rows
        self._max_delay_s = max_delay_ms / 1000
        self._observer = observer
        self._waiting: deque[_Waiting] = deque()
        self._running = False
        self._drainer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Calls of up to this many rows were measured faster than the inline bound: they run
        # inline. Learnt from calls in the executor, lowered again by a slow inline call.
        self._inline_rows = 0
        # Set once an inline call took too long by the clock: from then on a call in a thread
        # must be fast by the clock as well (not only in CPU time) to move back to the loop.
        self._waits = False

    async def submit(self, inputs: Arrays, rows: int) -> Timed:
        if self._max_queue is not None and len(self._waiting) >= self._max_queue:
            raise Overloaded(
                f"{len(self._waiting)} requests are already waiting for this model version; "
                "retry later"
            )
        loop = self._running_loop()
        if not self._running and self._max_delay_s == 0:
            # The model is idle: call it from this request's own task, with no queue, future
            # or drainer task in between, so batching costs nothing at low load. A call fast
            # enough to run inline waits for the requests that are ready to share it, unless
            # the request is too large to share a call anyway.
            if rows > self._inline_rows:
                self._running = True
                return await self._call_alone(loop, inputs, rows)
            if rows >= self._max_rows:
                self._running = True
                return self._call_inline(loop, inputs, rows)
        # A fast model's drainer runs its calls inline; started now, its task runs after the
        # request tasks already scheduled, so the requests that are ready share one call.
        future: asyncio.Future[Timed] = loop.create_future()
        self._waiting.append(_Waiting(inputs, rows, future, time.perf_counter()))
        if rows > self._inline_rows:  # an inline call empties the queue within this turn
            self._queue_changed()
        if not self._running:
            self._running = True
            self._start_draining(loop)
        return await future

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the batcher serves, looked up once (a system call each time on Python
        3.11); again only once that loop closed (a test's)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _start_draining(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the model to a drainer task if requests wait, else mark it idle."""
        if not self._waiting:
            self._running = False
            return
        # Kept referenced: the event loop holds tasks only weakly.
        self._drainer = loop.create_task(self._drain())

    def _measured(self, inputs: Arrays, rows: int) -> Prediction:
        """The model call, in a worker thread, timed there: a call fast enough runs inline next.

        Timed in the thread's CPU time: its wall time counts the loop's turns on a busy core.
        """
        started, wall_started = time.thread_time(), time.perf_counter()
        prediction = self._predict(inputs)
        seconds = time.thread_time() - started
        bound = self._inline_call_s
        if seconds < bound and (
            not self._waits or time.perf_counter() - wall_started < self._inline_wall_s
        ):
            # A call's cost grows at most in proportion to its rows (a fixed part is most of a
            # small call), so this many rows stay under the bound; a slow inline call corrects it.
            scaled = rows if seconds <= 0 else int(rows * bound / seconds)
            self._inline_rows = max(self._inline_rows, scaled)
        return prediction

    async def _call_alone(
        self, loop: asyncio.AbstractEventLoop, inputs: Arrays, rows: int
    ) -> Timed:
        started = time.perf_counter()
        call = self._executor.submit(self._measured, inputs, rows)
        try:
            prediction = await asyncio.wrap_future(call, loop=loop)
        except asyncio.CancelledError:
            # The model stays busy until the abandoned call returns; then the queue moves on.
            call.add_done_callback(
                lambda _: loop.call_soon_threadsafe(self._abandoned_call_done, loop, rows, started)
            )
            raise
        except Exception as exc:  # the batcher boundary: a failing call fails its request only
            logger.exception("prediction failed")
            self._start_draining(loop)
            raise PredictionFailed(f"the model failed: {type(exc).__name__}") from exc
        self._start_draining(loop)
        compute = time.perf_counter() - started
        self._call_done(rows, compute)
        return Timed(prediction, 0.0, compute)

    def _call_inline(self, loop: asyncio.AbstractEventLoop, inputs: Arrays, rows: int) -> Timed:
        started = time.perf_counter()
        try:
            prediction = self._inline(inputs, rows)
        except Exception as exc:  # the batcher boundary, as in _call_alone
            logger.exception("prediction failed")
            raise PredictionFailed(f"the model failed: {type(exc).__name__}") from exc
        finally:
            self._start_draining(loop)
        compute = time.perf_counter() - started
        self._call_done(rows, compute)
        return Timed(prediction, 0.0, compute)

    def _abandoned_call_done(
        self, loop: asyncio.AbstractEventLoop, rows: int, started: float
    ) -> None:
        self._call_done(rows, time.perf_counter() - started)
        self._start_draining(loop)

    def _call_done(self, rows: int, seconds: float) -> None:
        if self._observer is not None:
            self._observer.call_done(rows, seconds)

    def _queue_changed(self) -> None:
        if self._observer is not None:
            self._observer.queue_changed(len(self._waiting))

    def _take(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        rows = 0
        while self._waiting:
            item = self._waiting[0]
            if item.future.done():  # the client gave up; do not compute for it
                self._waiting.popleft()
                continue
            if batch and rows + item.rows > self._max_rows:
                break
            batch.append(self._waiting.popleft())
            rows += item.rows
        self._queue_changed()
        return batch

    async def _drain(self) -> None:
        try:
            while self._waiting:
                if self._max_delay_s > 0 and sum(w.rows for w in self._waiting) < self._max_rows:
                    await asyncio.sleep(self._max_delay_s)
                batch = self._take()
                if batch:
                    await self._run(batch)
        finally:
            self._running = False

    async def _run(self, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        loop = self._running_loop()
        merged = batch[0].inputs if len(batch) == 1 else _concatenate([w.inputs for w in batch])
        rows = sum(w.rows for w in batch)
        inline = rows <= self._inline_rows
        try:
            if inline:
                prediction = self._inline(merged, rows)
            else:
                prediction = await loop.run_in_executor(
                    self._executor, self._measured, merged, rows
                )
        except Exception as exc:  # the batcher boundary: a failing call fails its requests only
            if len(batch) > 1:
                # Run each request alone, so one bad request cannot fail its neighbours.
                for item in batch:
                    await self._run([item])
                return
            logger.exception("prediction failed")
            _settle(
                batch[0].future, exc=PredictionFailed(f"the model failed: {type(exc).__name__}")
            )
            return
        self._settle_batch(batch, prediction, started, time.perf_counter() - started)

    def _inline(self, inputs: Arrays, rows: int) -> Prediction:
        """The model call on the loop; one too slow for it sends calls this large to a thread."""
        cpu_started, wall_started = time.thread_time(), time.perf_counter()
        prediction = self._predict(inputs)
        if time.perf_counter() - wall_started >= self._inline_wall_s:
            self._waits = True
            self._inline_rows = min(self._inline_rows, rows - 1)
        elif time.thread_time() - cpu_started >= self._inline_call_s:
            self._inline_rows = min(self._inline_rows, rows - 1)
        return prediction

    def _settle_batch(
        self, batch: list[_Waiting], prediction: Prediction, started: float, compute: float
    ) -> None:
        """Each request of a call gets its own rows of the prediction."""
        if self._observer is not None:
            self._observer.call_done(sum(w.rows for w in batch), compute)
        if len(batch) == 1:
            _settle(batch[0].future, Timed(prediction, started - batch[0].enqueued, compute))
            return
        start = 0
        for item in batch:
            stop = start + item.rows
            _settle(
                item.future, Timed(prediction.rows(start, stop), started - item.enqueued, compute)
            )
            start = stop


def _concatenate(parts: list[Arrays]) -> Arrays:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _settle(
    future: "asyncio.Future[Timed]",
    result: Timed | None = None,
    exc: Exception | None = None,
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    elif result is not None:
        future.set_result(result)


async def predict_unbatched(
    predict: Callable[[Arrays], Prediction], executor: Executor, inputs: Arrays
) -> Timed:
    """One call for one request, for models whose tensors have no row axis to merge on."""
    started = time.perf_counter()
    try:
        prediction = await asyncio.get_running_loop().run_in_executor(executor, predict, inputs)
    except Exception as exc:
        logger.exception("prediction failed")
        raise PredictionFailed(f"the model failed: {type(exc).__name__}") from exc
    return Timed(prediction, 0.0, time.perf_counter() - started)
