"""Payload logging: a sample of requests with their answers, handed to a sink off the request
path through a bounded queue; what does not fit is dropped and counted, never waited for."""

import asyncio
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from numpy.typing import NDArray

from service.config import Settings
from service.observability.metrics import Metrics
from service.observability.payload_sinks import (
    CloudEventSink,
    JsonLinesFile,
    PayloadRecord,
    Sink,
    SinkError,
)
from service.store.registry import ModelEntry, ModelVersion

logger = logging.getLogger(__name__)

# Records taken from the queue per write: one lock and one write() for a file.
_BATCH = 256
# A writer that found fewer waits this long before it looks again.
_PAUSE_S = 0.05
# At shutdown, how long the queued records get to reach the sink: a dead one must not hold it up.
CLOSE_S = 5.0


class PayloadLog:
    """Samples requests at their model's rate and writes them from a thread of its own."""

    def __init__(self, sink: Sink, rate: float, queue_size: int, metrics: Metrics) -> None:
        self.sink = sink
        self.rate = rate
        self._queue: queue.Queue[PayloadRecord] = queue.Queue(queue_size)
        self._counter = metrics.payload_records
        self._children: dict[tuple[str, int, str], Any] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._failing: str | None = None

    def offer(
        self,
        entry: ModelEntry | None,
        model: ModelVersion,
        request_id: str,
        inputs: Mapping[str, NDArray[Any]],
        outputs: Mapping[str, NDArray[Any]],
    ) -> None:
        """Log this request if the draw at its model's rate says so, unless the queue is full.

        The record holds the arrays themselves: they are encoded by the writer thread.
        """
        rate = self.rate
        if entry is not None and (own := entry.config.payload_log.rate) is not None:
            rate = own
        if rate <= 0 or random.random() >= rate:
            return
        default = entry is None or entry.default_version == model.version
        record = PayloadRecord(
            request_id,
            model.name,
            model.version,
            "default" if default else "canary",
            time.time(),
            inputs,
            outputs,
        )
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._count(record, "dropped")

    def _count(self, record: PayloadRecord, outcome: str, amount: int = 1) -> None:
        key = (record.model, record.version, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(
                record.model, str(record.version), outcome
            )
        child.inc(amount)

    async def run(self) -> None:
        """Write from a thread of its own while the worker serves; once cancelled (at
        shutdown), give what is queued `CLOSE_S` seconds to reach the sink."""
        self._thread.start()
        try:
            await asyncio.Future()
        finally:
            await asyncio.to_thread(self._close, CLOSE_S)

    def _close(self, timeout_s: float) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():  # else a dead sink holds it: the daemon thread is left
            self.sink.close()

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)
            if len(batch) < _BATCH:
                # Let records gather: the thread then wakes a few times a second, not once
                # per request, and takes the event loop's GIL and CPU that much less often.
                self._stopping.wait(_PAUSE_S)

    def _write(self, batch: list[PayloadRecord]) -> None:
        delivered = 0
        try:
            self.sink.write(batch)
            delivered = len(batch)
        except SinkError as exc:
            delivered = exc.delivered
            if self._failing is None:
                logger.warning("payload log: records are lost while the sink fails: %s", exc)
            self._failing = str(exc)
        except Exception:  # the writer's boundary: a bug loses its batch, not the thread
            logger.exception("payload log: writing %d records failed", len(batch))
        else:
            if self._failing is not None:
                logger.info("payload log: the sink works again")
                self._failing = None
        for number, record in enumerate(batch):
            self._count(record, "written" if number < delivered else "failed")


def create_payload_log(settings: Settings, metrics: Metrics) -> PayloadLog | None:
    """The payload log the settings ask for, not yet started; None without a sink."""
    sink: Sink
    if settings.payload_log_file is not None:
        try:
            sink = JsonLinesFile(
                settings.payload_log_file,
                settings.payload_log_max_bytes,
                settings.payload_log_backups,
            )
        except OSError as exc:
            # Off rather than a failed start: the server serves, and logs no feature values.
            logger.error(
                "payload logging is off: %s cannot be written (%s); set "
                "MODELSERVE_PAYLOAD_LOG_FILE to a file in a writable folder",
                settings.payload_log_file,
                exc,
            )
            return None
        logger.info("payload log: %s", sink.path)
    elif settings.payload_log_url is not None:
        # Where the events come from, as a URL of this server (KServe names its logger's).
        source = f"http://{socket.gethostname()}:{settings.port}/"
        sink = CloudEventSink(settings.payload_log_url, settings.payload_log_timeout_s, source)
        logger.info("payload log: CloudEvents to %s", sink.url)
    else:
        return None
    return PayloadLog(sink, settings.payload_log_rate, settings.payload_log_queue, metrics)
