"""A file's parts: planned at line starts or row groups, and each scored into its own file.

A CSV or NDJSON file is split into byte ranges at line starts, a Parquet file into runs of
row groups; planning reads no more than the header and a line at each boundary. A part
counts the rows before it only when an error has to name one, and then scores itself again.
Lines are rows unless a quoted CSV value holds a newline: a part that finds one (a line with
an odd number of quotes, or fewer rows than lines) cannot trust its start, so the file is
scored as one part, read by a parser that follows the quotes (`Unsplittable`).
"""

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

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
    read_csv_rows,
)
from service.protocols.lines import BLOCK_BYTES, LineChunks, quotes_span_lines
from service.scoring import ModelReference, cached_model
from service.scoring.chunks import score_chunk
from service.scoring.columns import ColumnTypes, check_declared, job_column_types
from service.scoring.tabular import ERROR_COLUMN, check_columns, feature_names
from service.store.registry import ModelVersion

_READ_BYTES = 1 << 22
Report = Callable[[int, int], None]  # rows, and bytes (or row groups) consumed


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


class Unsplittable(Exception):
    """Quoted values of a CSV part may hold newlines: its lines are not its rows, and a part
    after it may start inside a value. Only the whole file, read following the quotes, is
    safe."""

    def __init__(self, index: int) -> None:
        super().__init__(f"part {index}: quoted values span lines")
        self.index = index


def _read_header(source: BinaryIO, max_row_bytes: int) -> list[str]:
    """A CSV's column names, from its first line (which is a row, as long as a row may be)."""
    header = source.readline(max_row_bytes + 2)
    if len(header.rstrip(b"\n")) > max_row_bytes:
        raise InvalidInput(
            f"the header line is longer than {max_row_bytes} bytes, the limit of "
            "one row (MODELSERVE_MAX_ROW_BYTES)"
        )
    return parse_csv_header(header)


def input_columns(source: Path, input_format: str, max_row_bytes: int) -> list[str] | None:
    """The columns a file names: a CSV's header, a Parquet file's schema; None for NDJSON,
    whose rows name their own."""
    if input_format == "parquet":
        return list(open_parquet(source).schema_arrow.names)
    if input_format != "csv":
        return None
    with source.open("rb") as file:
        return _read_header(file, max_row_bytes)


def _line_parts(job: ScoreFile, workers: int) -> list[Part]:
    size = job.source.stat().st_size
    columns: list[str] | None = None
    with job.source.open("rb") as source:
        if job.input_format == "csv":
            columns = _read_header(source, job.max_row_bytes)
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


def _whole(job: ScoreFile, part: Part) -> bool:
    return part.index == 0 and part.stop >= job.source.stat().st_size


class _Quoted(Exception):
    """A block of lines may have been cut inside a quoted value."""


def _decode_lines(block: bytes, columns: list[str] | None) -> Chunk:
    if columns is None:
        return decode_ndjson(block)  # JSON strings hold no raw newlines
    try:
        chunk = decode_csv(block, columns)
    except InvalidInput:
        if b'"' in block:  # perhaps a value cut at a newline it holds
            raise _Quoted() from None
        raise
    if quotes_span_lines(block, chunk.table.num_rows):
        raise _Quoted()
    return chunk


def _line_chunks(job: ScoreFile, part: Part) -> Iterator[tuple[Chunk, int]]:
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
                yield _decode_lines(block, part.columns), len(block)
        rest = lines.finish()
        if rest:
            yield _decode_lines(rest, part.columns), len(rest)


def _quoted_chunks(job: ScoreFile, part: Part) -> Iterator[tuple[Chunk, int]]:
    """The whole file's rows as a parser that follows quotes across lines cuts them."""
    assert part.columns is not None
    if part.stop <= part.start:
        return
    with job.source.open("rb") as source:
        source.seek(part.start)
        done = part.start
        for table in read_csv_rows(source, part.columns, max(BLOCK_BYTES, job.max_row_bytes)):
            for offset in range(0, table.num_rows, job.chunk_rows):
                yield Chunk(table.slice(offset, job.chunk_rows)), 0
            position = min(source.tell(), part.stop)
            yield Chunk(table.slice(0, 0)), position - done
            done = position
    yield Chunk(pa.table({})), part.stop - done


def _chunks(job: ScoreFile, part: Part, quoted: bool) -> Iterator[tuple[Chunk, int]]:
    """The part's rows chunk by chunk, with how many bytes (or row groups) each consumed."""
    if job.input_format == "parquet":
        parquet = open_parquet(job.source)
        for group in range(part.start, part.stop):
            for chunk in parquet_chunks(parquet, job.chunk_rows, [group]):
                yield chunk, 0
            yield Chunk(parquet.schema_arrow.empty_table()), 1
    elif quoted:
        yield from _quoted_chunks(job, part)
    else:
        yield from _line_chunks(job, part)


class _StartOver(Exception):
    """The part is scored again from its start: with the rows before it counted, or `quoted`."""

    def __init__(self, rows: int, consumed: int, quoted: bool) -> None:
        super().__init__()
        self.rows = rows  # the progress reported before it
        self.consumed = consumed
        self.quoted = quoted


class _Skipping:
    """The progress of a part scored again: what the earlier pass reported is not repeated."""

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


def _score_rows(job: ScoreFile, part: Part, path: Path, report: Report, quoted: bool) -> int:
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
            for chunk, used in _chunks(job, part, quoted):
                table = chunk.table
                if table.num_rows:
                    if rows == 0:  # the CSV header was checked already; this finds NDJSON's
                        job.check_columns(model, table.column_names)
                    predict = model.runtime.predict
                    table = score_chunk(
                        model, chunk, first_row + rows, job.on_error, predict, types
                    )
                    if unnumbered and _names_rows(job, table):
                        raise _StartOver(rows, consumed, quoted=False)
                    out.write(encoder.encode(table))
                rows += table.num_rows
                consumed += used
                report(table.num_rows, used)
        except _Quoted:
            raise _StartOver(rows, consumed, quoted=True) from None
        except ServiceError:
            if unnumbered:
                raise _StartOver(rows, consumed, quoted=False) from None
            raise
        if rows == 0 and part.index == 0 and part.columns and job.output_format == "csv":
            # Only the first part writes the CSV header: it does so with no rows of its own too
            # (blank lines), for the rows of the parts after it.
            empty = Chunk(pa.table({name: pa.array([], pa.string()) for name in part.columns}))
            predict = model.runtime.predict
            out.write(encoder.encode(score_chunk(model, empty, 0, job.on_error, predict, types)))
        out.write(encoder.close())
    return rows


def score_part(job: ScoreFile, part: Part, path: Path, report: Report, quoted: bool = False) -> int:
    """Scores one part into `path`; returns its rows. Raises PartFailed, or Unsplittable when
    quoted values span lines in a part that is not the whole file."""
    try:
        while True:
            try:
                return _score_rows(job, part, path, report, quoted)
            except _StartOver as again:
                report = _Skipping(report, again.rows, again.consumed)
                if again.quoted:
                    if quoted or not _whole(job, part):
                        raise Unsplittable(part.index) from None
                    quoted = True
                else:  # rare: an error names a row; count the rows before the part
                    part = replace(part, first_row=_rows_before(job, part))
    except ServiceError as exc:
        raise PartFailed(part.index, exc.message) from None
    except OSError as exc:
        raise PartFailed(part.index, f"{type(exc).__name__}: {exc}") from None
