"""The memory budget of inference requests: what all requests in flight may hold at once.

A request reserves its body's size times what serving it costs per byte of body before the
body is read, and holds that until its answer is made. One that would take the total past the
budget is refused with 503 and `Retry-After` at once: the client tries again when memory is
free, instead of the process growing until the kernel ends it.
"""

from types import TracebackType

from service.errors import Overloaded

# Bytes a request holds per byte of body, from reading it to answering: the body, the arrays
# decoded from it, their copy in the model's dtype, the model's outputs and the answer. Measured
# on the iris classifier (a label and three probabilities per row of four features) with a
# million rows: 6.6 times the body for V2 JSON, 8.8 for V1 (whose probabilities are nested),
# 7.2 for binary (whose body is denser).
EXPANSION = 9


class MemoryBudget:
    """Bytes reserved by requests in flight; used from the event loop only, so never contended."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0
        self.taken = 0  # reservations made: a count that moves while requests come

    def reservation(self) -> "Reservation":
        return Reservation(self)

    def take(self, nbytes: int, held: int) -> int:
        """Reserve `nbytes` for a request already holding `held`; returns what was reserved."""
        # A request larger than the whole budget may still run, alone.
        nbytes = min(nbytes, self.limit - held)
        if self.reserved + nbytes > self.limit:
            raise Overloaded(
                f"requests in flight hold {self.reserved} of the {self.limit} bytes of "
                "MODELSERVE_MAX_DECODING_BYTES; retry shortly, or send a smaller body"
            )
        self.reserved += nbytes
        self.taken += 1
        return nbytes


class Reservation:
    """One request's share of the budget, grown as its body arrives and returned at the end."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.held = 0

    def grow(self, body_bytes: int) -> None:
        """Reserve for `body_bytes` more of body (refuses with Overloaded)."""
        self.held += self.budget.take(body_bytes * EXPANSION, self.held)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Returns what is held (once: a second call returns nothing)."""
        self.budget.reserved -= self.held
        self.held = 0
