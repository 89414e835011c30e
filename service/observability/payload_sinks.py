"""Where sampled payloads go: a JSON-lines file rotated by size, or CloudEvents over HTTP.

Both are called from the payload log's writer thread only, never from the event loop.
"""

import fcntl
import http.client
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import orjson
from numpy.typing import NDArray

from service.store.tensors import datatype_of

# The event types of KServe's payload logger, so that its consumers take our events unchanged.
REQUEST_EVENT = "org.kubeflow.serving.inference.request"
RESPONSE_EVENT = "org.kubeflow.serving.inference.response"


@dataclass(frozen=True, slots=True)
class PayloadRecord:
    """One sampled request and its answer, as the model saw them."""

    request_id: str
    model: str
    version: int
    # KServe's name for which part of the traffic answered: "default", or "canary" for a
    # version other than the model's default (a traffic split, a pinned version).
    endpoint: str
    time: float
    inputs: Mapping[str, NDArray[Any]]
    outputs: Mapping[str, NDArray[Any]]


class SinkError(Exception):
    """The sink failed; the first `delivered` records of the batch got there."""

    def __init__(self, reason: str, delivered: int) -> None:
        super().__init__(reason)
        self.delivered = delivered


class Sink(Protocol):
    def write(self, records: Sequence[PayloadRecord]) -> None:
        """Deliver `records` in order, or raise SinkError."""

    def close(self) -> None: ...


def _as_list(value: Any) -> Any:
    # orjson hands over the arrays it cannot write itself: strings, objects, odd dtypes.
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _tensors(arrays: Mapping[str, NDArray[Any]]) -> list[dict[str, Any]]:
    """Tensors in the V2 JSON shape, their data flat in row-major order."""
    tensors = []
    for name, array in arrays.items():
        try:
            datatype = datatype_of(array.dtype)
        except ValueError:
            datatype = "BYTES"
        tensors.append(
            {
                "name": name,
                "datatype": datatype,
                "shape": list(array.shape),
                "data": np.ascontiguousarray(array).reshape(-1),
            }
        )
    return tensors


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_as_list)


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def encode_line(record: PayloadRecord) -> bytes:
    """The record as one JSON line."""
    return (
        _dumps(
            {
                "id": record.request_id,
                "time": _timestamp(record.time),
                "model": record.model,
                "version": str(record.version),
                "endpoint": record.endpoint,
                "inputs": _tensors(record.inputs),
                "outputs": _tensors(record.outputs),
            }
        )
        + b"\n"
    )


class JsonLinesFile:
    """Appends records to a file shared by every worker; past `max_bytes` the file is
    renamed to FILE.1 (FILE.1 to FILE.2, ...) and a new one begun.

    Each batch is written under an exclusive lock on the file's folder, so workers never
    interleave within a line and exactly one of them rotates; a worker that finds the file
    rotated by another reopens it.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path.resolve()
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._folder = os.open(self.path.parent, os.O_RDONLY)
        self._fd: int | None = None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._folder, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._folder, fcntl.LOCK_UN)

    def _current(self) -> int:
        """The file at `path` now, reopened when another worker has rotated it away."""
        fd = self._fd
        if fd is not None:
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        # Owner-only: the file holds feature values.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _rotate(self) -> int:
        for number in range(self.backups, 0, -1):
            source = self.path if number == 1 else Path(f"{self.path}.{number - 1}")
            if source.exists():
                os.replace(source, f"{self.path}.{number}")
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        return self._current()

    @staticmethod
    def _append(fd: int, lines: list[bytes]) -> None:
        data = memoryview(b"".join(lines))
        while data:
            data = data[os.write(fd, data) :]

    def write(self, records: Sequence[PayloadRecord]) -> None:
        lines = [encode_line(record) for record in records]
        delivered = 0
        try:
            with self._locked():
                fd = self._current()
                size = os.fstat(fd).st_size
                chunk: list[bytes] = []
                for line in lines:
                    # A line never straddles two files; one longer than max_bytes has its own.
                    if size and size + len(line) > self.max_bytes:
                        self._append(fd, chunk)
                        delivered += len(chunk)
                        chunk = []
                        fd, size = self._rotate(), 0
                    chunk.append(line)
                    size += len(line)
                self._append(fd, chunk)
        except OSError as exc:
            raise SinkError(f"{self.path}: {exc}", delivered) from exc

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        os.close(self._folder)


class CloudEventSink:
    """Posts each record as two CloudEvents in binary mode (attributes in `ce-` headers, the
    V2 message as the body), the request's and the response's, as KServe's logger does."""

    def __init__(self, url: str, timeout_s: float, source: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self._https = parts.scheme.lower() == "https"
        self._host = parts.hostname or "localhost"
        self._port = parts.port
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._timeout_s = timeout_s
        self._source = source
        self._connection: http.client.HTTPConnection | None = None

    def _post(self, headers: dict[str, str], body: bytes) -> None:
        connection = self._connection
        if connection is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = self._connection = kind(self._host, self._port, timeout=self._timeout_s)
        try:
            connection.request("POST", self._target, body, headers)
            response = connection.getresponse()
            response.read()
        except BaseException:
            connection.close()
            self._connection = None
            raise
        if response.status >= 300:
            raise http.client.HTTPException(f"the sink answered {response.status}")

    def _headers(self, record: PayloadRecord, kind: str) -> dict[str, str]:
        return {
            "content-type": "application/json",
            "ce-specversion": "1.0",
            "ce-id": record.request_id,
            "ce-type": kind,
            "ce-source": self._source,
            "ce-time": _timestamp(record.time),
            "ce-inferenceservicename": record.model,
            "ce-component": "predictor",
            "ce-endpoint": record.endpoint,
            "ce-modelversion": str(record.version),
        }

    def write(self, records: Sequence[PayloadRecord]) -> None:
        for delivered, record in enumerate(records):
            request = {"id": record.request_id, "inputs": _tensors(record.inputs)}
            response = {
                "model_name": record.model,
                "model_version": str(record.version),
                "id": record.request_id,
                "outputs": _tensors(record.outputs),
            }
            try:
                self._post(self._headers(record, REQUEST_EVENT), _dumps(request))
                self._post(self._headers(record, RESPONSE_EVENT), _dumps(response))
            except (OSError, http.client.HTTPException) as exc:
                raise SinkError(f"{self.url}: {exc or type(exc).__name__}", delivered) from exc

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
