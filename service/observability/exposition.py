"""What GET /metrics exposes: this process's registry, or the merged values of every worker.

With several worker processes each one writes its values to files in the directory named by
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode), and whichever worker answers
a scrape reads them all: counters and histograms are summed over workers, live and exited, and
gauges follow their `multiprocess_mode`. Process metrics cannot be written to those files, so
they are read from /proc for each live worker and labelled with its `pid`.
"""

import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Metric,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

# prometheus_client reads it when imported, so it is set before any worker imports it.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Every worker writes this file as soon as it builds its metrics (the in-flight gauge has no
# labels, so its value exists from the start): its pid names a worker, live or exited.
_WORKER_FILES = "gauge_livesum_*.db"


@contextmanager
def worker_metrics(workers: int) -> Iterator[None]:
    """Several workers share their metrics through files in a fresh directory, removed at exit.

    Files left by an earlier run would add its counts to this one's, so the directory is
    always new; one worker keeps its metrics in memory.
    """
    os.environ.pop(MULTIPROCESS_ENV, None)
    if workers == 1:
        yield
        return
    directory = tempfile.mkdtemp(prefix="modelserve-metrics-")
    os.environ[MULTIPROCESS_ENV] = directory
    try:
        yield
    finally:
        os.environ.pop(MULTIPROCESS_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def multiprocess_directory() -> Path | None:
    value = os.environ.get(MULTIPROCESS_ENV)
    return Path(value) if value else None


def exposition_registry(registry: CollectorRegistry, directory: Path | None) -> CollectorRegistry:
    """The registry GET /metrics serves; `registry` holds this process's own metrics."""
    # `_created` series double the series count, and multiprocess mode has none: without
    # them one worker and several expose the same series.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    if directory is None:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        return registry
    merged = CollectorRegistry()
    merged.register(WorkersCollector(directory))
    PlatformCollector(registry=merged)
    return merged


def worker_exited(directory: Path) -> None:
    """Takes this worker's live gauges (in-flight requests, readiness) out of the sums."""
    mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]  # untyped in prometheus_client


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkersCollector:
    """The workers' merged metric files plus the process metrics of each live worker."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        self._processes: dict[int, ProcessCollector] = {}
        # Scrapes run in a thread pool; two at once must not sweep the same dead worker.
        self._lock = threading.Lock()

    def live_workers(self) -> list[int]:
        """The pids of live workers; the live gauges of exited ones are dropped on the way."""
        live: list[int] = []
        for path in self._directory.glob(_WORKER_FILES):
            pid = int(path.stem.rsplit("_", 1)[1])
            if _alive(pid):
                live.append(pid)
            else:
                # A worker that crashed never ran its shutdown, which does this for itself.
                mark_process_dead(pid, str(self._directory))  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        return sorted(live)

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            workers = self.live_workers()
            processes = self._process_metrics(workers)
        yield from self._files.collect()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        yield from processes

    def _process_metrics(self, workers: list[int]) -> list[Metric]:
        for gone in self._processes.keys() - set(workers):
            del self._processes[gone]
        merged: dict[str, Metric] = {}
        for pid in workers:
            collector = self._processes.get(pid)
            if collector is None:
                collector = ProcessCollector(pid=functools.partial(int, pid), registry=None)
                self._processes[pid] = collector
            for metric in collector.collect():
                family = merged.setdefault(
                    metric.name, Metric(metric.name, metric.documentation, metric.type)
                )
                for sample in metric.samples:
                    family.samples.append(
                        sample._replace(labels={**sample.labels, "pid": str(pid)})
                    )
        return list(merged.values())
