"""Per-client rate limits: a token bucket per API key, token subject or anonymous address.

Buckets live in this worker's memory, so with several workers each enforces the limit on the
requests it receives. The table is bounded: past `max_clients` the least recently seen client
is forgotten, so a flood of new addresses costs memory once and then only evicts (an evicted
client starts again with a full burst, which errs on the side of serving it).
"""

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Literal

from prometheus_client import Counter

from service.config import Rate
from service.errors import RateLimited
from service.server.auth import Identity

ClientClass = Literal["api_key", "token", "anonymous"]


def client_of(identity: Identity | None, address: str) -> tuple[ClientClass, str]:
    """The client a bucket belongs to, named without any secret (a key by its key id)."""
    if identity is None or identity.kind == "anonymous":
        return "anonymous", "address:" + address
    if identity.kind == "token":
        return "token", identity.name
    return "api_key", identity.name


class RateLimiter:
    def __init__(
        self,
        rate: Rate,
        rejected: Counter,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.max_clients = max_clients
        self._clock = clock
        self._rejected = {cls: rejected.labels(cls) for cls in ("api_key", "token", "anonymous")}
        # client -> [tokens, when they were counted]; oldest use first.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def admit(self, identity: Identity | None, address: str) -> None:
        """Take one token from the caller's bucket, or raise `RateLimited` with how long until
        one is back."""
        client_class, client = client_of(identity, address)
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None:
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
            bucket = buckets[client] = [self.rate.burst, now]
        else:
            buckets.move_to_end(client)
            bucket[0] = min(self.rate.burst, bucket[0] + (now - bucket[1]) * self.rate.per_second)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return
        self._rejected[client_class].inc()
        wait = math.ceil((1.0 - bucket[0]) / self.rate.per_second)
        raise RateLimited(
            f"this client ({client_class}) is over its rate limit of "
            f"{self.rate.per_second:g} requests/s (burst {self.rate.burst:g}); "
            f"retry after {wait} s",
            retry_after_s=max(1, wait),
        )

    def clients(self) -> int:
        return len(self._buckets)
