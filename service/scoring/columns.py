"""Column types of a scoring job, fixed before its first chunk so no output column changes type.

A CSV has no types: its cells are text and stay text in every output format, except the
feature columns, which are numbers (float64) in formats that have types, and the columns the
caller declares (`column_types=id:int64,day:date32`; `--column-types` offline). NDJSON and
Parquet keep their own types unless declared. A cell that does not fit its column's type is
a bad row, as a feature that is not a number is: it stops the job, or with on_error=skip its
row gets the error and the cell is left empty.
"""

from collections.abc import Collection

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from service.errors import InvalidInput
from service.protocols.files import Chunk, RowError

ColumnTypes = dict[str, pa.DataType]

TYPE_NAMES = (
    "string",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float32",
    "float64",
    "date32",
    "timestamp[s]",
    "timestamp[ms]",
    "timestamp[us]",
    "timestamp[ns]",
)
_CAST_FAILED = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
_NAMES = {pa.type_for_alias(name): name for name in TYPE_NAMES}  # as the caller writes them


def parse_column_types(text: str) -> ColumnTypes:
    """`id:int64,day:date32` (the same syntax over HTTP and on the command line)."""
    types: ColumnTypes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, colon, kind = item.rpartition(":")
        name, kind = name.strip(), kind.strip().lower()
        if not colon or not name:
            raise InvalidInput(
                f"column type {item!r} is not NAME:TYPE; write for example id:int64,day:date32"
            )
        if kind not in TYPE_NAMES:
            raise InvalidInput(
                f"column {name!r} has the unknown type {kind!r}; use one of {', '.join(TYPE_NAMES)}"
            )
        if name in types:
            raise InvalidInput(f"column {name!r} is given a type twice")
        types[name] = pa.type_for_alias(kind)
    return types


def job_column_types(
    features: list[str], declared: ColumnTypes, input_format: str, output_format: str
) -> ColumnTypes:
    """The types every chunk's columns are cast to: the declared ones, and numbers for the
    features of a CSV whose output has types."""
    types: ColumnTypes = {}
    if input_format == "csv" and output_format != "csv":
        types = dict.fromkeys(features, pa.float64())
    return {**types, **declared}


def check_declared(declared: Collection[str], columns: Collection[str]) -> None:
    """Refuse a declared type for a column the input does not have: a typo would be silent."""
    unknown = [name for name in declared if name not in columns]
    if unknown:
        raise InvalidInput(
            f"column_types names {', '.join(repr(n) for n in unknown)}, not a column of the "
            f"input; its columns are {', '.join(repr(c) for c in columns)}"
        )


def _describe(value: object, kind: pa.DataType) -> str:
    text = str(value)[:40]
    if pa.types.is_floating(kind):
        return f"not a number: {text!r}"
    return f"not a valid {_NAMES.get(kind, kind)}: {text!r}"


def _bad_cells(column: pa.Array, kind: pa.DataType, offset: int = 0) -> list[int]:
    """The cells that do not cast, by halving: a few casts when few cells are bad."""
    try:
        pc.cast(column, kind)
    except _CAST_FAILED:
        if len(column) == 1:
            return [] if column.null_count else [offset]
        half = len(column) // 2
        return _bad_cells(column.slice(0, half), kind, offset) + _bad_cells(
            column.slice(half), kind, offset + half
        )
    return []


def _cast(column: pa.Array, kind: pa.DataType) -> tuple[pa.Array, list[tuple[int, object]]]:
    """The column in `kind`, with the cells that do not fit it (left empty) and their values."""
    try:
        return pc.cast(column, kind), []
    except _CAST_FAILED:
        pass
    if pa.types.is_string(column.type):
        # Text for a typed column: surrounding spaces are not part of the value, and an
        # empty cell is a missing value, not a bad one. (Arrow refuses both, so a column
        # that cast at once has neither.)
        column = pc.utf8_trim_whitespace(column)
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
        try:
            return pc.cast(column, kind), []
        except _CAST_FAILED:
            pass
    bad = _bad_cells(column, kind)
    flags = np.zeros(len(column), dtype=np.bool_)
    flags[bad] = True
    values = [(row, column[row].as_py()) for row in bad]
    emptied = pc.if_else(pa.array(flags), pa.scalar(None, column.type), column)
    try:
        return pc.cast(emptied, kind), values
    except _CAST_FAILED:  # Arrow has no such cast at all (bool to date32): no value fits
        return pa.nulls(len(column), kind), values


def apply_column_types(chunk: Chunk, types: ColumnTypes) -> Chunk:
    """The chunk with its columns in the job's types; cells that do not fit are row errors."""
    table, errors = chunk.table, list(chunk.errors)
    for index, name in enumerate(table.column_names):
        kind = types.get(name)
        if kind is None or table.schema.field(index).type == kind:
            continue
        column, bad = _cast(table.column(index).combine_chunks(), kind)
        table = table.set_column(index, pa.field(name, kind), column)
        errors += [RowError(row, name, _describe(value, kind)) for row, value in bad]
    for name, kind in types.items():  # NDJSON rows may leave a key out of a whole chunk
        if name not in table.column_names:
            table = table.append_column(pa.field(name, kind), pa.nulls(table.num_rows, kind))
    errors.sort(key=lambda e: e.row)  # stable: a row's first column first
    return Chunk(table, errors)
