"""The batcher merges requests that arrive while the model is busy, and splits answers back."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.errors import PredictionFailed
from service.prediction.batching import (
    INLINE_CALL_S,
    INLINE_WALL_FACTOR,
    ONE_CORE_INLINE_CALL_S,
    Batcher,
    inline_call_bound,
)
from service.store.runtimes import Arrays, Prediction


class Recorder:
    """Observes calls the way the metrics do."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def call_done(self, rows: int, seconds: float) -> None:
        self.calls.append(rows)

    def queue_changed(self, depth: int) -> None:
        pass


def slow_double(inputs: Arrays) -> Prediction:
    time.sleep(0.02)  # long enough for the other requests to queue up meanwhile
    x = inputs["x"]
    if (x < 0).any():
        raise ValueError("negative input")
    return Prediction({"y": x * 2, "first": x[:, 0].copy()}, label_index=x[:, 0].astype(np.intp))


def run(
    batcher: Batcher, requests: list[np.ndarray], spacing_s: float = 0.0
) -> list[Arrays | BaseException]:
    """Submit the requests `spacing_s` apart, as clients arriving one after another."""

    async def one(index: int, rows: np.ndarray) -> Arrays:
        await asyncio.sleep(index * spacing_s)
        prediction = (await batcher.submit({"x": rows}, len(rows))).prediction
        # Each request's label positions are its own rows' share of the batch's.
        assert prediction.label_index is not None
        assert prediction.label_index.tolist() == rows[:, 0].astype(np.intp).tolist()
        return prediction.outputs

    async def main() -> list[Arrays | BaseException]:
        return await asyncio.gather(
            *(one(i, r) for i, r in enumerate(requests)), return_exceptions=True
        )

    return asyncio.run(main())


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2)


def test_concurrent_requests_share_calls_and_get_their_own_rows(
    executor: ThreadPoolExecutor,
) -> None:
    recorder = Recorder()
    batcher = Batcher(slow_double, executor, max_rows=64, observer=recorder)
    requests = [np.full((i % 3 + 1, 2), i, dtype=np.float32) for i in range(20)]
    results = run(batcher, requests, spacing_s=0.002)
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result["y"], request * 2)
        np.testing.assert_array_equal(result["first"], request[:, 0])
    assert recorder.calls[0] == len(requests[0])  # the first request ran at once, alone
    assert len(recorder.calls) < len(requests)
    assert sum(recorder.calls) == sum(len(r) for r in requests)


def test_calls_never_exceed_max_rows(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    batcher = Batcher(slow_double, executor, max_rows=4, observer=recorder)
    run(batcher, [np.ones((3, 2), dtype=np.float32) for _ in range(6)])
    assert max(recorder.calls) <= 4


def test_a_failing_request_does_not_fail_its_neighbours(executor: ThreadPoolExecutor) -> None:
    batcher = Batcher(slow_double, executor, max_rows=64)
    requests = [np.ones((1, 2), dtype=np.float32) * (-1 if i == 3 else 1) for i in range(8)]
    results = run(batcher, requests)
    assert isinstance(results[3], PredictionFailed)
    assert all(not isinstance(r, BaseException) for i, r in enumerate(results) if i != 3)


def test_model_runs_off_the_event_loop(executor: ThreadPoolExecutor) -> None:
    threads: list[str] = []

    def record_thread(inputs: Arrays) -> Prediction:
        threads.append(threading.current_thread().name)
        return Prediction({"y": inputs["x"]})

    run(Batcher(record_thread, executor, max_rows=8), [np.ones((1, 1))])
    assert threads
    assert threads[0] != threading.main_thread().name


def test_a_call_takes_whole_requests_up_to_max_rows(executor: ThreadPoolExecutor) -> None:
    recorder = Recorder()
    batcher = Batcher(slow_double, executor, max_rows=7, observer=recorder)
    requests = [np.ones((1, 2), dtype=np.float32), *(np.full((3, 2), i) for i in range(1, 6))]
    results = run(batcher, requests)
    # The first runs alone at once; the rest queue and are packed whole, never split.
    assert recorder.calls == [1, 6, 6, 3]
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result["y"], request * 2)


@pytest.mark.parametrize("delay_ms", [0.0, 5.0])
def test_requests_one_after_another_run_alone(
    executor: ThreadPoolExecutor, delay_ms: float
) -> None:
    recorder = Recorder()
    batcher = Batcher(slow_double, executor, max_rows=64, max_delay_ms=delay_ms, observer=recorder)
    requests = [np.full((1, 2), i, dtype=np.float32) for i in range(4)]
    results = run(batcher, requests, spacing_s=0.05)  # each arrives after the last finished
    assert recorder.calls == [1, 1, 1, 1]
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, BaseException)
        np.testing.assert_array_equal(result["y"], request * 2)


def test_a_cancelled_request_keeps_the_model_busy_until_its_call_returns(
    executor: ThreadPoolExecutor,
) -> None:
    recorder = Recorder()
    batcher = Batcher(slow_double, executor, max_rows=64, observer=recorder)

    async def main() -> list[Arrays]:
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 2))}, 1))
        await asyncio.sleep(0.005)
        first.cancel()
        # These arrive while the cancelled request's call still runs: they must wait for it,
        # then share one call.
        later = [np.full((1, 2), 2.0), np.full((2, 2), 3.0)]
        predictions = await asyncio.gather(*(batcher.submit({"x": r}, len(r)) for r in later))
        return [p.prediction.outputs for p in predictions]

    results = asyncio.run(main())
    assert recorder.calls == [1, 3]
    np.testing.assert_array_equal(results[1]["y"], np.full((2, 2), 6.0))


def test_a_fast_model_runs_on_the_loop_after_its_first_call(executor: ThreadPoolExecutor) -> None:
    threads: list[str] = []

    def fast(inputs: Arrays) -> Prediction:
        threads.append(threading.current_thread().name)
        return Prediction({"y": inputs["x"]}, label_index=inputs["x"][:, 0].astype(np.intp))

    batcher = Batcher(fast, executor, max_rows=8)
    main = threading.main_thread().name
    # Measured in a worker thread, far under INLINE_CALL_S (a cold first call may not be),
    # calls move to the loop; requests that are ready together then share one inline call.
    for _ in range(10):
        before = len(threads)
        results = run(batcher, [np.full((1, 1), i) for i in range(5)])
        if threads[before:] == [main]:
            break
    assert threads[0] != main
    assert threads[before:] == [main]
    assert [r["y"].tolist() for r in results if not isinstance(r, BaseException)] == [
        [[i]] for i in range(5)
    ]


def test_a_model_that_slows_down_goes_back_to_a_thread(executor: ThreadPoolExecutor) -> None:
    threads: list[str] = []
    delay = [0.0]

    def varying(inputs: Arrays) -> Prediction:
        threads.append(threading.current_thread().name)
        time.sleep(delay[0])
        return Prediction({"y": inputs["x"]}, label_index=inputs["x"][:, 0].astype(np.intp))

    batcher = Batcher(varying, executor, max_rows=8)
    main = threading.main_thread().name
    for _ in range(10):
        run(batcher, [np.ones((1, 1))])
        if threads[-1] == main:
            break
    assert threads[-1] == main
    # Waiting, as on I/O: no CPU time, but the loop stalls.
    delay[0] = 2 * INLINE_WALL_FACTOR * INLINE_CALL_S
    threads.clear()
    for _ in range(5):
        run(batcher, [np.ones((1, 1))])
    # At most once more inline, measured slow by the clock; then in a thread, where it stays.
    # (On a busy machine the last fast call may have been measured slow by CPU time; the next
    # call then runs in a thread, is learnt fast by CPU time and runs inline once more.)
    assert threads.count(main) <= 1
    assert main not in threads[-3:]


def spin(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time, as a model's computation does."""
    started = time.thread_time()
    while time.thread_time() - started < seconds:
        pass


@pytest.mark.parametrize(("cores", "inline"), [(1, True), (2, False)])
def test_a_worker_with_one_core_runs_calls_of_a_millisecond_on_the_loop(
    executor: ThreadPoolExecutor, cores: int, inline: bool
) -> None:
    """With one core a model thread cannot run beside the loop: a call of 0.3 ms CPU moves to
    the loop, even a request too large to share a call. With two it stays in a thread."""
    assert inline_call_bound(cores) == (ONE_CORE_INLINE_CALL_S if cores == 1 else INLINE_CALL_S)
    threads: list[str] = []

    def computing(inputs: Arrays) -> Prediction:
        threads.append(threading.current_thread().name)
        spin(3 * INLINE_CALL_S)
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError("negative input")
        return Prediction({"y": x * 2}, label_index=x[:, 0].astype(np.intp))

    recorder = Recorder()
    batcher = Batcher(
        computing, executor, max_rows=8, observer=recorder, inline_call_s=inline_call_bound(cores)
    )
    main = threading.main_thread().name
    large = np.arange(64, dtype=np.float32).reshape(32, 2)
    for _ in range(3):
        results = run(batcher, [large])
        assert not isinstance(results[0], BaseException)
        np.testing.assert_array_equal(results[0]["y"], large * 2)
    assert threads[0] != main  # the first call is measured in a thread
    assert (threads[-1] == main) is inline
    assert recorder.calls == [32, 32, 32]
    # A failing call on the loop fails its own request only.
    failed = run(batcher, [-large])
    assert isinstance(failed[0], PredictionFailed)
    again = run(batcher, [large])
    assert not isinstance(again[0], BaseException)
