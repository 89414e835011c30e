"""Request deadlines that cost a dict entry, not a timer each.

`asyncio.timeout` arms a timer per request (a handle on the loop's heap, cancelled again when the
request ends): about 5 µs, a twentieth of a small request. Almost every request ends long before
its deadline, so here one timer per loop waits for the earliest deadline only; when it fires it
cancels the requests whose time is up and sleeps until the next. The semantics are those of
`asyncio.timeout`: the block is cancelled at its deadline and raises TimeoutError.
"""

import asyncio
import weakref
from types import TracebackType

# uvloop's clock reads in milliseconds, cached once per turn of the loop: a deadline closer
# than that cannot be told from one already passed, and counts as passed.
RESOLUTION_S = 1e-3


class Deadline:
    """An `async with` block that times out at a loop time, which may be moved (reschedule)."""

    __slots__ = ("_cancelling", "_clock", "_expired", "_task", "_when")

    def __init__(self, clock: "_Clock", when: float | None) -> None:
        self._clock = clock
        self._when = when
        self._expired = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    def when(self) -> float | None:
        return self._when

    def reschedule(self, when: float | None) -> None:
        self._when = when
        if self._task is not None and when is not None:
            self._clock.due(when, self)

    async def __aenter__(self) -> "Deadline":
        task = asyncio.current_task(self._clock.loop)
        if task is None:
            raise RuntimeError("a Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._clock.enter(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._clock.leave(self)
        task, self._task = self._task, None
        if (
            self._expired
            and task is not None
            and exc_type is asyncio.CancelledError
            and task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    def _expire(self) -> None:
        if self._task is not None and not self._expired:
            self._expired = True
            self._task.cancel()


class _Clock:
    """The live deadlines of one loop, and the one timer for the earliest of them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._live: dict[Deadline, None] = {}
        self._timer: asyncio.TimerHandle | None = None

    def enter(self, deadline: Deadline) -> None:
        self._live[deadline] = None
        when = deadline.when()
        if when is not None:
            self.due(when, deadline)

    def leave(self, deadline: Deadline) -> None:
        self._live.pop(deadline, None)

    def due(self, when: float, deadline: Deadline) -> None:
        """Wake up by `when` at the latest; a deadline already past expires now, so that no
        work the block starts meanwhile (a model call on the loop, say) can finish first."""
        if when <= self.loop.time() + RESOLUTION_S:
            self._live.pop(deadline, None)
            deadline._expire()
            return
        timer = self._timer
        if timer is None or when < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        now = self.loop.time()
        earliest: float | None = None
        for deadline in list(self._live):
            when = deadline.when()
            if when is None:
                continue
            if when <= now + RESOLUTION_S:
                self._live.pop(deadline, None)
                deadline._expire()
            elif earliest is None or when < earliest:
                earliest = when
        if earliest is not None:
            self._timer = self.loop.call_at(earliest, self._sweep)


_clocks: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clock]" = (
    weakref.WeakKeyDictionary()
)


def deadline(seconds: float, loop: asyncio.AbstractEventLoop | None = None) -> Deadline:
    """A block that times out `seconds` from now, on the running loop (`loop`, when the caller
    knows it: looking it up costs a system call on Python 3.11)."""
    loop = loop or asyncio.get_running_loop()
    clock = _clocks.get(loop)
    if clock is None:
        clock = _clocks[loop] = _Clock(loop)
    return Deadline(clock, loop.time() + seconds)
