"""Column types of a scoring job: the declared syntax, and cells that do not fit their type."""

import pyarrow as pa
import pytest

from service.errors import InvalidInput
from service.protocols.files import Chunk, RowError
from service.scoring.columns import apply_column_types, job_column_types, parse_column_types


def test_declared_types_parse() -> None:
    assert parse_column_types(" id:int64, day:date32,ts:timestamp[ms] ,") == {
        "id": pa.int64(),
        "day": pa.date32(),
        "ts": pa.timestamp("ms"),
    }
    assert parse_column_types("a:b:string") == {"a:b": pa.string()}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id=int64", "'id=int64' is not NAME:TYPE"),
        (":int64", "is not NAME:TYPE"),
        ("id:integer", "unknown type 'integer'; use one of string, bool"),
        ("id:int64,id:string", "given a type twice"),
    ],
)
def test_bad_declarations_say_what_to_write(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_column_types(text)


def test_features_of_a_csv_are_numbers_only_where_the_output_has_types() -> None:
    assert job_column_types(["x"], {}, "csv", "csv") == {}
    assert job_column_types(["x"], {}, "csv", "parquet") == {"x": pa.float64()}
    assert job_column_types(["x"], {"x": pa.string()}, "csv", "ndjson") == {"x": pa.string()}
    assert job_column_types(["x"], {}, "ndjson", "parquet") == {}


def test_cells_that_do_not_fit_are_row_errors_and_left_empty() -> None:
    table = pa.table({"id": ["1", " 2 ", "", "A4", "5", "x6"], "name": list("abcdef")})
    chunk = apply_column_types(Chunk(table), {"id": pa.int64()})
    assert chunk.table.schema.field("id").type == pa.int64()
    assert chunk.table["id"].to_pylist() == [1, 2, None, None, 5, None]
    assert chunk.table["name"].to_pylist() == list("abcdef")
    assert chunk.errors == [
        RowError(3, "id", "not a valid int64: 'A4'"),
        RowError(5, "id", "not a valid int64: 'x6'"),
    ]


def test_a_declared_key_that_a_chunk_lacks_is_an_empty_column() -> None:
    chunk = apply_column_types(Chunk(pa.table({"x": [1.5]})), {"id": pa.string()})
    assert chunk.table.schema.field("id").type == pa.string()
    assert chunk.table["id"].to_pylist() == [None]


def test_a_type_arrow_cannot_cast_to_empties_the_column_with_row_errors() -> None:
    chunk = apply_column_types(Chunk(pa.table({"d": [True, None]})), {"d": pa.date32()})
    assert chunk.table["d"].to_pylist() == [None, None]
    assert chunk.errors == [RowError(0, "d", "not a valid date32: 'True'")]  # null is missing
