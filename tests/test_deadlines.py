"""Request deadlines: one timer per loop, the semantics of asyncio.timeout."""

import asyncio
import time

import pytest

from service.server.deadlines import deadline


def test_a_block_past_its_deadline_times_out_at_the_deadline() -> None:
    async def main() -> float:
        started = time.perf_counter()
        with pytest.raises(TimeoutError):
            async with deadline(0.05):
                await asyncio.sleep(5)
        return time.perf_counter() - started

    assert 0.04 < asyncio.run(main()) < 1.0


def test_blocks_that_end_in_time_leave_the_later_ones_their_deadlines() -> None:
    async def one(seconds: float, sleep: float) -> str:
        try:
            async with deadline(seconds):
                await asyncio.sleep(sleep)
        except TimeoutError:
            return "timeout"
        return "done"

    async def main() -> list[str]:
        return list(await asyncio.gather(one(0.05, 0.0), one(0.2, 0.1), one(0.1, 1.0), one(0.3, 5)))

    assert asyncio.run(main()) == ["done", "done", "timeout", "timeout"]


def test_a_deadline_moved_earlier_fires_earlier_and_none_never_fires() -> None:
    async def main() -> tuple[float, str]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        async def moved_earlier() -> None:
            async with deadline(10) as block:
                block.reschedule(loop.time() + 0.05)
                await asyncio.sleep(5)

        with pytest.raises(TimeoutError):
            await moved_earlier()
        moved = time.perf_counter() - started
        async with deadline(0.01) as block:
            block.reschedule(None)
            await asyncio.sleep(0.1)
        return moved, "survived"

    moved, outcome = asyncio.run(main())
    assert moved < 1.0
    assert outcome == "survived"


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def main() -> None:
        async def blocked() -> None:
            async with deadline(10):
                await asyncio.sleep(5)

        task = asyncio.create_task(blocked())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
