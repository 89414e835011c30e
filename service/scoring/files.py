"""`modelserve score`: a file scored offline by worker processes, each over its own part.

A CSV or NDJSON file is split into byte ranges at line starts, a Parquet file into runs of
row groups. Each worker loads the model itself (hash checks included), streams its part
chunk by chunk into a part file, and reports progress; the parts are joined in order at the
end, so OUTPUT only appears once every row is scored.
"""

import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

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
from service.scoring import ModelReference, cached_model
from service.scoring.chunks import score_chunk
from service.scoring.columns import ColumnTypes, check_declared, job_column_types
from service.scoring.progress import ProgressBar
from service.scoring.tabular import check_columns, feature_names
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
    first_row: int = 0  # rows before this part, so that errors name rows of the whole file


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
    parts: list[Part] = []
    first_row = 0
    for i, (a, b) in enumerate(spans):
        parts.append(Part(i, a, b, columns, first_row))
        first_row += _count_lines(job.source, a, b)
    return parts


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
    if job.input_format == "parquet":
        return _parquet_parts(job, job.workers)
    return _line_parts(job, job.workers)


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

    lines = LineChunks(job.chunk_rows, job.max_row_bytes, first_row=part.first_row)
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


def score_part(job: ScoreFile, part: Part, path: Path, report: Report) -> int:
    """Scores one part into `path`; returns its rows. Raises PartFailed."""
    try:
        model = cached_model(job.reference)
        encoder = make_encoder(job.output_format, header=part.index == 0)
        types = job_column_types(
            feature_names(model), job.column_types, job.input_format, job.output_format
        )
        rows = 0
        with path.open("wb") as out:
            for chunk, consumed in _chunks(job, part):
                if chunk.table.num_rows:
                    if rows == 0:  # the CSV header was checked already; this finds NDJSON's
                        job.check_columns(model, chunk.table.column_names)
                    first_row = part.first_row + rows
                    table = score_chunk(
                        model, chunk, first_row, job.on_error, model.runtime.predict, types
                    )
                    out.write(encoder.encode(table))
                rows += chunk.table.num_rows
                report(chunk.table.num_rows, consumed)
            out.write(encoder.close())
        return rows
    except ServiceError as exc:
        raise PartFailed(part.index, exc.message) from None
    except OSError as exc:
        raise PartFailed(part.index, f"{type(exc).__name__}: {exc}") from None


def _worker(job: ScoreFile, part: Part, path: Path, queue: Any) -> None:
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
    with target.open("wb") as out:
        if job.output_format != "parquet" or len(parts) == 1:
            for part in parts:
                with (folder / f"part-{part.index}").open("rb") as piece:
                    shutil.copyfileobj(piece, out, _READ_BYTES)
            return
        # Parquet parts cannot be concatenated as bytes: their row groups are copied over.
        encoder = make_encoder("parquet")
        for part in parts:
            piece = open_parquet(folder / f"part-{part.index}")
            for chunk in parquet_chunks(piece, job.chunk_rows):
                out.write(encoder.encode(chunk.table))
        out.write(encoder.close())


def score_file(job: ScoreFile, bar: ProgressBar) -> int:
    """Scores INPUT into OUTPUT; returns the rows scored. Raises ServiceError on failure."""
    model = cached_model(job.reference)  # fail fast, before any worker starts
    feature_names(model)
    parts = plan_parts(job)
    if parts[0].columns is not None:
        job.check_columns(model, parts[0].columns)
    target = job.target.resolve()
    with tempfile.TemporaryDirectory(prefix=".score-", dir=target.parent) as tmp:
        folder = Path(tmp)
        if len(parts) == 1:
            try:
                rows = score_part(job, parts[0], folder / "part-0", bar.advance)
            except PartFailed as exc:
                raise InvalidInput(exc.message) from None
        else:
            workers = _Workers(job, parts, folder)
            rows = workers.run(bar)
            if workers.failed is not None:
                raise InvalidInput(workers.failed.message)
        if rows == 0:
            raise InvalidInput(f"{job.source} has no rows to score")
        partial = folder / "joined"
        join_parts(job, parts, folder, partial)
        os.replace(partial, target)
    bar.close()
    return rows
