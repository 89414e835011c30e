"""What the lifespan builds and the handlers use: one object on the app's state."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

from prometheus_client import CollectorRegistry

from service.auth import Credentials
from service.config import Settings
from service.metrics import Metrics
from service.registry import LoadOptions, Registry
from service.router import Router
from service.runtimes import RuntimeOptions

logger = logging.getLogger(__name__)


def load_options(settings: Settings) -> LoadOptions:
    return LoadOptions(
        allow_unverified_pickle=settings.allow_unverified_pickle,
        runtime=RuntimeOptions(
            strict_versions=settings.strict_versions,
            onnx_intra_op_threads=settings.onnx_intra_op_threads,
            onnx_inter_op_threads=settings.onnx_inter_op_threads,
        ),
        batching_max_rows=settings.batching_max_rows,
        batching_max_delay_ms=settings.batching_max_delay_ms,
        model_name=settings.model_name,
    )


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    # What GET /metrics and the statistics read: with several workers, all of them merged.
    prometheus: CollectorRegistry
    executor: ThreadPoolExecutor
    router: Router
    ready: bool = False
    # Set on SIGTERM: readiness and new inference requests answer 503 from then on.
    draining: bool = False
    # Serialises repository changes, so two loads cannot swap registries out of order.
    repository_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def registry(self) -> Registry:
        return self.router.registry

    @property
    def options(self) -> LoadOptions:
        return load_options(self.settings)

    @cached_property
    def credentials(self) -> Credentials:
        return Credentials.from_settings(self.settings)

    def start_draining(self) -> None:
        if not self.draining:
            logger.info("shutting down: no new requests; finishing the accepted ones")
        self.draining = True
        self.ready = False
