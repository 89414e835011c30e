"""What the lifespan builds and the handlers use: one object on the app's state."""

import asyncio
import logging
from dataclasses import dataclass, field
from functools import cached_property

from prometheus_client import CollectorRegistry

from service.config import Settings
from service.jobs.store import JobStore
from service.observability.metrics import Metrics
from service.prediction.router import Router
from service.server.auth import Credentials
from service.server.memory import MemoryBudget
from service.server.ratelimit import RateLimiter
from service.store.registry import LoadOptions, Registry

logger = logging.getLogger(__name__)


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    # What GET /metrics and the statistics read: with several workers, all of them merged.
    prometheus: CollectorRegistry
    router: Router
    ready: bool = False
    # Batch jobs' records and files; opened by the lifespan.
    jobs: JobStore | None = None
    # Set on SIGTERM: readiness and new inference requests answer 503 from then on.
    draining: bool = False
    # Serialises repository changes, so two loads cannot swap registries out of order.
    repository_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def registry(self) -> Registry:
        return self.router.registry

    @property
    def options(self) -> LoadOptions:
        return self.settings.load_options()

    @cached_property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that serves requests, looked up once: on Python 3.11 each
        `asyncio.get_running_loop()` makes a getpid system call, and on a small request the
        four the path made cost as much as decoding it."""
        return asyncio.get_running_loop()

    @cached_property
    def credentials(self) -> Credentials:
        return Credentials.from_settings(self.settings)

    @cached_property
    def limiter(self) -> RateLimiter | None:
        """Per-client rate limits, or None without MODELSERVE_RATE_LIMIT (a cached attribute:
        the boundary's whole cost when unset is reading it)."""
        rate = self.settings.rate()
        if rate is None:
            return None
        return RateLimiter(rate, self.metrics.rate_limited, self.settings.rate_limit_clients)

    def serving_ready(self) -> bool:
        """Ready once the repository is loaded; a model whose versions all failed is reported
        per model, so one broken artifact never takes the whole server out of rotation.
        Serving a single model (KServe), the server is only as ready as that model."""
        if self.ready and (name := self.settings.model_name) is not None:
            entry = self.registry.models.get(name)
            return entry is not None and entry.ready
        return self.ready

    @cached_property
    def memory(self) -> MemoryBudget:
        """What the inference requests being decoded may hold at once."""
        return MemoryBudget(self.settings.max_decoding_bytes)

    def start_draining(self) -> None:
        if not self.draining:
            logger.info("shutting down: no new requests; finishing the accepted ones")
        self.draining = True
        self.ready = False
