"""Batch files: CSV, NDJSON and Parquet decoded into Arrow tables chunk by chunk, and encoded back.

Line formats arrive as a byte stream that `LineChunks` (lines.py) cuts into blocks of whole
lines, so a file of any size is held one chunk at a time. CSV cells are decoded as text, so
pass-through columns come back exactly as they were sent (identifiers keep their leading zeros)
and never change type between chunks; the scoring job gives columns their types. Parquet keeps
its column types.
"""

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from service.errors import InvalidInput, UnsupportedMediaType

FORMATS = ("csv", "ndjson", "parquet")
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "ndjson": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}
_MEDIA_TYPES = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/x-jsonlines": "ndjson",
    "application/jsonlines": "ndjson",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "application/parquet": "parquet",
}
_SUFFIXES = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson", ".parquet": "parquet"}


def format_of_media_type(content_type: str | None) -> str:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    found = _MEDIA_TYPES.get(media_type)
    if found is None:
        raise UnsupportedMediaType(
            f"content type {media_type or '(none)'!r} is not a batch file; send text/csv, "
            "application/x-ndjson or application/vnd.apache.parquet"
        )
    return found


def format_of_accept(accept: str | None, default: str) -> str:
    """The first format the client accepts; the input's own format for */* or no header."""
    for item in (accept or "").split(","):
        media_type = item.split(";", 1)[0].strip().lower()
        if media_type in ("", "*/*", "text/*", "application/*"):
            return default
        if media_type in _MEDIA_TYPES:
            return _MEDIA_TYPES[media_type]
    raise UnsupportedMediaType(
        f"cannot answer in {accept!r}; accept text/csv, application/x-ndjson or "
        "application/vnd.apache.parquet"
    )


def format_of_path(path: Path) -> str | None:
    return _SUFFIXES.get(path.suffix.lower())


@dataclass(frozen=True)
class RowError:
    row: int  # 0-based within the chunk
    column: str | None
    reason: str

    def describe(self, first_row: int) -> str:
        """The error with the row counted from 1 over the whole input."""
        where = f"row {first_row + self.row + 1}"
        if self.column is not None:
            where += f", column {self.column!r}"
        return f"{where}: {self.reason}"


@dataclass
class Chunk:
    """Rows of the input as a table, and the rows that could not even be read."""

    table: pa.Table
    errors: list[RowError] = field(default_factory=list)


def parse_csv_header(line: bytes) -> list[str]:
    try:
        text = line.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InvalidInput("the CSV header is not UTF-8 text; send the file as UTF-8") from None
    header = next(csv.reader([text]), [])
    if not header or not any(name.strip() for name in header):
        raise InvalidInput("the CSV has no header row; its first line must name the columns")
    return header


def decode_csv(block: bytes, columns: list[str]) -> Chunk:
    """A block of CSV lines, every cell as text, as written."""
    # One Arrow block for the whole of ours: a row may be as long as the row limit allows.
    options = pa_csv.ReadOptions(
        column_names=columns, use_threads=False, block_size=max(len(block), 1)
    )
    try:
        table = pa_csv.read_csv(
            pa.py_buffer(block),
            read_options=options,
            convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string())),
        )
    except pa.ArrowInvalid as exc:
        raise InvalidInput(f"malformed CSV: {str(exc).splitlines()[0]}") from None
    return Chunk(table)


def read_csv_rows(source: BinaryIO, columns: list[str], block_bytes: int) -> Iterator[pa.Table]:
    """CSV rows as Arrow's streaming reader cuts them, following quotes across lines, every
    cell as text: for files whose quoted values hold newlines, which blocks of lines would cut.
    A row may be as long as a block."""
    options = pa_csv.ReadOptions(column_names=columns, use_threads=False, block_size=block_bytes)
    try:
        reader = pa_csv.open_csv(
            source,
            read_options=options,
            parse_options=pa_csv.ParseOptions(newlines_in_values=True),
            convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string())),
        )
        for batch in reader:
            yield pa.Table.from_batches([batch])
    except pa.ArrowInvalid as exc:
        if "straddl" in str(exc):
            raise InvalidInput(
                f"a row is longer than {block_bytes} bytes, the limit of one row "
                "(MODELSERVE_MAX_ROW_BYTES); end each row with a newline, or raise the limit"
            ) from None
        raise InvalidInput(f"malformed CSV: {str(exc).splitlines()[0]}") from None


def _parse_lines(block: bytes) -> Chunk:
    """The slow path for NDJSON that Arrow refused as a whole: find the bad lines."""
    rows: list[dict[str, Any]] = []
    errors: list[RowError] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            errors.append(RowError(len(rows), None, "not a JSON object"))
            row = {}
        rows.append(row)
    try:
        table = pa.Table.from_struct_array(pa.array(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InvalidInput(f"NDJSON values of one key must share a type: {exc}") from None
    return Chunk(table, errors)


def decode_ndjson(block: bytes) -> Chunk:
    try:
        table = pa_json.read_json(
            io.BytesIO(block),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=max(len(block), 1)),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return _parse_lines(block)
    return Chunk(table)


def open_parquet(source: str | Path | BinaryIO) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InvalidInput(f"not a readable Parquet file: {_readable(str(exc))}") from None


def _readable(reason: str) -> str:
    """A library's reason up to its first unprintable character: Parquet's Thrift decoder
    quotes the file's own bytes ("don't know what type: \\x0e"), which mean nothing to a user."""
    for index, char in enumerate(reason):
        if not char.isprintable():
            reason = reason[:index]
            break
    return reason.rstrip(" :")[:300] or "its metadata cannot be decoded"


def parquet_chunks(
    parquet: pq.ParquetFile, rows: int, row_groups: list[int] | None = None
) -> Iterator[Chunk]:
    """Chunks of at most `rows` rows, from every row group or from the ones listed."""
    for batch in parquet.iter_batches(batch_size=rows, row_groups=row_groups):
        yield Chunk(pa.Table.from_batches([batch]))


class Encoder(Protocol):
    def encode(self, table: pa.Table) -> bytes: ...

    def close(self) -> bytes: ...


class CsvEncoder:
    def __init__(self, header: bool = True) -> None:
        self._header = header

    def encode(self, table: pa.Table) -> bytes:
        # Arrow's unquoted style writes most files as they were read; it refuses a value that
        # needs quotes, and Arrow's other styles quote every string of the chunk.
        try:
            sink = pa.BufferOutputStream()
            options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
            pa_csv.write_csv(table, sink, options)
            data = bytes(sink.getvalue())
        except pa.ArrowInvalid:
            data = _quoted_csv(table)
        if self._header:  # written here: Arrow quotes every name of a header
            line = io.StringIO()
            csv.writer(line, lineterminator="\n").writerow(table.column_names)
            data = line.getvalue().encode() + data
            self._header = False
        return data

    def close(self) -> bytes:
        return b""


_NEEDS_QUOTES = '[",\r\n]'


def _quoted_csv(table: pa.Table) -> bytes:
    """The rows as Arrow's unquoted style writes them, quoting only the cells that need it."""
    cells = []
    for column in table.columns:
        text = pc.cast(column, pa.string())  # the text Arrow's writer gives each type
        needs = pc.match_substring_regex(text, _NEEDS_QUOTES)
        if pc.any(needs).as_py():
            doubled = pc.replace_substring(text, '"', '""')
            quoted = pc.binary_join_element_wise('"', doubled, '"', "")
            text = pc.if_else(needs, quoted, text)
        cells.append(text)
    empty_nulls = pc.JoinOptions(null_handling="replace", null_replacement="")
    lines = pc.binary_join_element_wise(*cells, ",", options=empty_nulls)
    lines = pc.binary_join_element_wise(lines, "", "\n")  # each row, then a newline
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    if not len(lines):
        return b""
    # The rows lie end to end in the array's data buffer: take them in one piece.
    _, offsets, data = lines.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
    return bytes(data[int(bounds[0]) : int(bounds[-1])])


def _short_floats(table: pa.Table) -> pa.Table:
    """float32 columns as the float64 with the same shortest text (0.1, not 0.100000001)."""
    for index, column in enumerate(table.columns):
        if pa.types.is_float32(column.type):
            text = pc.cast(column, pa.string())
            table = table.set_column(index, table.field(index).name, pc.cast(text, pa.float64()))
    return table


class NdjsonEncoder:
    def encode(self, table: pa.Table) -> bytes:
        rows = _short_floats(table).to_pylist()
        return b"".join([orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in rows])

    def close(self) -> bytes:
        return b""


class _Sink(io.RawIOBase):
    """A write-only file whose bytes are collected until taken."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]  # buffers arrive as bytes
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class ParquetEncoder:
    """One row group per chunk; every chunk is cast to the first chunk's schema."""

    def __init__(self) -> None:
        self._sink = _Sink()
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def encode(self, table: pa.Table) -> bytes:
        if self._writer is None:
            self._schema = pa.schema(
                [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
            )
            self._writer = pq.ParquetWriter(self._sink, self._schema)
        schema = self._schema
        if table.schema != schema:
            try:
                table = table.cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
                raise InvalidInput(_schema_change(schema, table.schema)) from None
        self._writer.write_table(table)
        return self._sink.take()

    def close(self) -> bytes:
        if self._writer is not None:
            self._writer.close()
        return self._sink.take()


def _schema_change(first: pa.Schema, later: pa.Schema) -> str:
    """Why a later chunk does not fit the schema of the Parquet file being written."""
    if first.names != later.names:
        return (
            f"the rows' columns changed from {', '.join(first.names)} to "
            f"{', '.join(later.names)}, which one Parquet file cannot hold; give every row "
            "the same keys"
        )
    changed = [f for f in first if f.type != later.field(f.name).type]
    name = changed[0].name if changed else first.names[0]
    return (
        f"column {name!r} changed type from {first.field(name).type} to "
        f"{later.field(name).type} between rows, which one Parquet file cannot hold; declare "
        f"its type: column_types={name}:TYPE"
    )


def make_encoder(file_format: str, header: bool = True) -> Encoder:
    if file_format == "csv":
        return CsvEncoder(header)
    if file_format == "ndjson":
        return NdjsonEncoder()
    return ParquetEncoder()
