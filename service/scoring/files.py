"""`modelserve score`: a file scored offline by worker processes, each over its own part.

A CSV or NDJSON file is split into byte ranges at line starts, a Parquet file into runs of
row groups; nothing reads the file but the workers. Each worker streams its part chunk by
chunk into a part file and reports progress; the parts are joined in order at the end
(joining.py), so OUTPUT only appears once every row is scored. Rows are counted from the
start of the file only when an error has to name one.
"""

import importlib.abc
import itertools
import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from queue import Empty
from typing import Any

import pyarrow as pa

from service.errors import InvalidInput, ServiceError
from service.protocols.files import (
    Chunk,
    decode_csv,
    decode_ndjson,
    make_encoder,
    open_parquet,
    parquet_chunks,
    parse_csv_header,
)
from service.protocols.lines import LineChunks
from service.scoring import ModelReference, cached_model, joining
from service.scoring.chunks import score_chunk
from service.scoring.columns import ColumnTypes, check_declared, job_column_types
from service.scoring.progress import ProgressBar
from service.scoring.tabular import ERROR_COLUMN, check_columns, feature_names
from service.store.registry import ModelVersion

logger = logging.getLogger(__name__)
_READ_BYTES = 1 << 22
Report = Callable[[int, int], None]


@dataclass(frozen=True)
class ScoreFile:
    reference: ModelReference
    source: Path
    target: Path
    input_format: str
    output_format: str
    chunk_rows: int = 65536
    workers: int = 1
    on_error: str = "fail"
    column_types: ColumnTypes = field(default_factory=dict)  # as declared by the caller
    max_row_bytes: int = 1 << 20

    def check_columns(self, model: ModelVersion, columns: list[str]) -> None:
        check_columns(model, columns)
        check_declared(self.column_types, columns)


@dataclass(frozen=True)
class Part:
    index: int
    start: int  # byte offset, or first row group for Parquet
    stop: int
    columns: list[str] | None  # the CSV header, read once by the parent
    # Rows before this part, so that errors name rows of the whole file; None when not counted
    # yet (the part counts them itself if an error needs them).
    first_row: int | None = 0


class PartFailed(Exception):
    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.message = message


def _line_parts(job: ScoreFile, workers: int) -> list[Part]:
    size = job.source.stat().st_size
    columns: list[str] | None = None
    with job.source.open("rb") as source:
        if job.input_format == "csv":
            header = source.readline(job.max_row_bytes + 2)
            if len(header.rstrip(b"\n")) > job.max_row_bytes:
                raise InvalidInput(
                    f"the header line is longer than {job.max_row_bytes} bytes, the limit of "
                    "one row (MODELSERVE_MAX_ROW_BYTES)"
                )
            columns = parse_csv_header(header)
        start = source.tell()
        bounds = [start]
        for i in range(1, workers):
            source.seek(max(start + (size - start) * i // workers - 1, bounds[-1]))
            # To the start of the next line, in pieces: a line may be longer than memory.
            while (piece := source.readline(_READ_BYTES)) and not piece.endswith(b"\n"):
                pass
            bounds.append(max(source.tell(), bounds[-1]))
    bounds.append(size)
    spans = [(a, b) for a, b in itertools.pairwise(bounds) if b > a] or [(start, start)]
    return [Part(i, a, b, columns, None if i else 0) for i, (a, b) in enumerate(spans)]


def _count_lines(path: Path, start: int, stop: int) -> int:
    lines = 0
    with path.open("rb") as source:
        source.seek(start)
        remaining = stop - start
        while remaining > 0:
            data = source.read(min(_READ_BYTES, remaining))
            if not data:
                break
            remaining -= len(data)
            lines += data.count(b"\n")
    return lines


def _parquet_parts(job: ScoreFile, workers: int) -> list[Part]:
    parquet = open_parquet(job.source)
    groups = parquet.num_row_groups
    workers = max(1, min(workers, groups))
    bounds = [groups * i // workers for i in range(workers + 1)]
    metadata = parquet.metadata
    rows = [0]
    for group in range(groups):
        rows.append(rows[-1] + metadata.row_group(group).num_rows)
    return [Part(i, a, b, None, rows[a]) for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def plan_parts(job: ScoreFile) -> list[Part]:
    """The parts of the input, one per worker. The rows before a CSV or NDJSON part are not
    counted (first_row None): that would read the whole file before any worker starts."""
    if job.input_format == "parquet":
        return _parquet_parts(job, job.workers)
    return _line_parts(job, job.workers)


def count_rows(job: ScoreFile, parts: list[Part]) -> tuple[list[int], int]:
    """The rows before each part, and in the whole input (for CSV and NDJSON, its lines:
    this reads the file)."""
    if job.input_format == "parquet":
        metadata = open_parquet(job.source).metadata
        rows = [0]
        for group in range(metadata.num_row_groups):
            rows.append(rows[-1] + metadata.row_group(group).num_rows)
        return [rows[part.start] for part in parts], rows[-1]
    first_rows = [0]
    for part in parts:
        first_rows.append(first_rows[-1] + _count_lines(job.source, part.start, part.stop))
    return first_rows[:-1], first_rows[-1]


def _rows_before(job: ScoreFile, part: Part) -> int:
    lines = _count_lines(job.source, 0, part.start)
    return lines - 1 if job.input_format == "csv" else lines  # the CSV header is not a row


def _chunks(job: ScoreFile, part: Part) -> Iterator[tuple[Chunk, int]]:
    """The part's rows chunk by chunk, with how many bytes (or row groups) each consumed."""
    if job.input_format == "parquet":
        parquet = open_parquet(job.source)
        for group in range(part.start, part.stop):
            for chunk in parquet_chunks(parquet, job.chunk_rows, [group]):
                yield chunk, 0
            yield Chunk(parquet.schema_arrow.empty_table()), 1
        return

    def decode(block: bytes) -> Chunk:
        if part.columns is None:
            return decode_ndjson(block)
        return decode_csv(block, part.columns)

    lines = LineChunks(job.chunk_rows, job.max_row_bytes, first_row=part.first_row or 0)
    with job.source.open("rb") as source:
        source.seek(part.start)
        remaining = part.stop - part.start
        while remaining > 0:
            data = source.read(min(_READ_BYTES, remaining))
            if not data:
                break
            remaining -= len(data)
            for block in lines.feed(data):
                yield decode(block), len(block)
        rest = lines.finish()
        if rest:
            yield decode(rest), len(rest)


class _Unnumbered(Exception):
    """An error names a row of a part whose first row is not counted yet."""

    def __init__(self, rows: int, consumed: int) -> None:
        super().__init__()
        self.rows = rows  # the progress reported before it
        self.consumed = consumed


class _Again:
    """The progress of a part scored a second time: what the first time reported is skipped."""

    def __init__(self, report: Report, rows: int, consumed: int) -> None:
        self._report = report
        self._rows = rows
        self._consumed = consumed

    def __call__(self, rows: int, consumed: int) -> None:
        skip_rows, skip_bytes = min(rows, self._rows), min(consumed, self._consumed)
        self._rows -= skip_rows
        self._consumed -= skip_bytes
        if rows > skip_rows or consumed > skip_bytes:
            self._report(rows - skip_rows, consumed - skip_bytes)


def _names_rows(job: ScoreFile, scored: pa.Table) -> bool:
    """Whether a scored chunk's error column (on_error=skip) names rows."""
    return job.on_error == "skip" and scored[ERROR_COLUMN].null_count < scored.num_rows


def _score_rows(job: ScoreFile, part: Part, path: Path, report: Report) -> int:
    model = cached_model(job.reference)
    encoder = make_encoder(job.output_format, header=part.index == 0)
    types = job_column_types(
        feature_names(model), job.column_types, job.input_format, job.output_format
    )
    unnumbered = part.first_row is None
    first_row = part.first_row or 0
    rows = consumed = 0
    with path.open("wb") as out:
        try:
            for chunk, used in _chunks(job, part):
                table = chunk.table
                if table.num_rows:
                    if rows == 0:  # the CSV header was checked already; this finds NDJSON's
                        job.check_columns(model, table.column_names)
                    predict = model.runtime.predict
                    table = score_chunk(
                        model, chunk, first_row + rows, job.on_error, predict, types
                    )
                    if unnumbered and _names_rows(job, table):
                        raise _Unnumbered(rows, consumed)
                    out.write(encoder.encode(table))
                rows += table.num_rows
                consumed += used
                report(table.num_rows, used)
        except ServiceError:
            if unnumbered:
                raise _Unnumbered(rows, consumed) from None
            raise
        out.write(encoder.close())
    return rows


def score_part(job: ScoreFile, part: Part, path: Path, report: Report) -> int:
    """Scores one part into `path`; returns its rows. Raises PartFailed."""
    try:
        try:
            return _score_rows(job, part, path, report)
        except _Unnumbered as again:
            # Rare: an error names a row. Count the rows before the part, and score it again.
            numbered = replace(part, first_row=_rows_before(job, part))
            return _score_rows(job, numbered, path, _Again(report, again.rows, again.consumed))
    except ServiceError as exc:
        raise PartFailed(part.index, exc.message) from None
    except OSError as exc:
        raise PartFailed(part.index, f"{type(exc).__name__}: {exc}") from None


def _worker(job: ScoreFile, part: Part, path: Path, queue: Any) -> None:
    skip_pandas()  # a spawned worker starts afresh

    def report(rows: int, consumed: int) -> None:
        queue.put(("progress", part.index, rows, consumed))

    try:
        rows = score_part(job, part, path, report)
    except PartFailed as exc:
        queue.put(("failed", part.index, exc.message, 0))
        return
    except Exception as exc:  # the worker boundary: the parent reports it and stops
        logger.exception("scoring part %d failed", part.index)
        queue.put(("failed", part.index, f"{type(exc).__name__}: {exc}", 0))
        return
    queue.put(("done", part.index, rows, 0))


class _Workers:
    """One process per part; on a failure, the parts after it stop and the ones before finish,
    so the error reported is the first one in the file."""

    def __init__(self, job: ScoreFile, parts: list[Part], folder: Path) -> None:
        # Forked workers start at once with the model the parent loaded and checked; where
        # fork is missing they start afresh and load it themselves.
        methods = multiprocessing.get_all_start_methods()
        context: Any = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self.queue: Any = context.Queue()
        self.processes = {
            part.index: context.Process(
                target=_worker,
                args=(job, part, folder / f"part-{part.index}", self.queue),
                daemon=True,
            )
            for part in parts
        }
        self.rows: dict[int, int] = {}
        self.failed: PartFailed | None = None

    def waiting(self) -> list[int]:
        limit = self.failed.index if self.failed is not None else len(self.processes)
        return [i for i in self.processes if i not in self.rows and i < limit]

    def fail(self, failure: PartFailed) -> None:
        self.rows[failure.index] = 0
        if self.failed is None or failure.index < self.failed.index:
            self.failed = failure
            for later, process in self.processes.items():
                if later > failure.index:
                    process.terminate()  # their rows come after the failure

    def check_exits(self) -> None:
        for i in self.waiting():
            code = self.processes[i].exitcode
            if code is not None and self.queue.empty():
                self.fail(PartFailed(i, f"worker {i} stopped with exit code {code}"))

    def run(self, bar: ProgressBar) -> int:
        for process in self.processes.values():
            process.start()
        try:
            while self.waiting():
                try:
                    kind, index, value, extra = self.queue.get(timeout=0.5)
                except Empty:
                    self.check_exits()
                    continue
                if kind == "progress":
                    bar.advance(value, extra)
                elif kind == "done":
                    self.rows[index] = value
                else:
                    self.fail(PartFailed(index, value))
        finally:
            for process in self.processes.values():
                if process.is_alive():
                    process.terminate()
                process.join()
        return sum(self.rows.values())


def join_parts(job: ScoreFile, parts: list[Part], folder: Path, target: Path) -> None:
    """The parts' files (part-N in `folder`) joined into `target`; they stay as they are."""
    paths = [folder / f"part-{part.index}" for part in parts]
    joining.join_parts(job.output_format, paths, target, job.chunk_rows)


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "pandas":
            raise ImportError("pandas is not needed here")


def skip_pandas() -> None:
    """Has pyarrow take pandas for absent in this process.

    On its first conversion of any value, pyarrow imports pandas (0.15 s, as long as scoring
    150,000 rows) only to ask whether the value is a pandas object; this command never gives
    it one. pandas itself stays importable (a scikit-learn pipeline may use it).
    """
    if "pandas" in sys.modules:
        return
    blocker = _NoPandas()
    sys.meta_path.insert(0, blocker)
    try:
        pa.array([0])  # pyarrow looks for pandas once per process, on its first conversion
    finally:
        sys.meta_path.remove(blocker)


def score_file(job: ScoreFile, bar: ProgressBar) -> int:
    """Scores INPUT into OUTPUT; returns the rows scored. Raises ServiceError on failure."""
    skip_pandas()
    model = cached_model(job.reference)  # fail fast, before any worker starts
    feature_names(model)
    parts = plan_parts(job)
    if parts[0].columns is not None:
        job.check_columns(model, parts[0].columns)
    target = job.target.resolve()
    with tempfile.TemporaryDirectory(prefix=".score-", dir=target.parent) as tmp:
        folder = Path(tmp)
        paths = [folder / f"part-{part.index}" for part in parts]
        if len(parts) == 1:
            try:
                rows = score_part(job, parts[0], paths[0], bar.advance)
            except PartFailed as exc:
                raise InvalidInput(exc.message) from None
        else:
            workers = _Workers(job, parts, folder)
            rows = workers.run(bar)
            if workers.failed is not None:
                raise InvalidInput(workers.failed.message)
        if rows == 0:
            raise InvalidInput(f"{job.source} has no rows to score")
        # The first part becomes OUTPUT: the others are appended to it, it is not copied.
        joining.append_parts(job.output_format, paths[0], paths[1:], job.chunk_rows)
        os.replace(paths[0], target)
    bar.close()
    return rows
