"""Parts of a scored file joined in order: bytes for line formats, row groups for Parquet."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.errors import InvalidInput
from service.scoring.joining import append_parts, join_parts

CHUNK_ROWS = 1000


def table(start: int, rows: int, label: str = "setosa") -> pa.Table:
    ids = np.arange(start, start + rows)
    return pa.table(
        {
            "id": pa.array([f"{i:06d}" for i in ids]),
            "petal_width": pa.array(ids / 7.0),
            "label": pa.array([label] * rows),
            "probability_setosa": pa.array(np.linspace(0, 1, rows, dtype=np.float32)),
        }
    )


def write_part(path: Path, data: pa.Table, group_rows: int = 700) -> Path:
    pq.write_table(data, path, row_group_size=group_rows)
    return path


def data_bytes(path: Path) -> bytes:
    """A Parquet file's row groups: everything between the magic and the footer."""
    data = path.read_bytes()
    footer = int.from_bytes(data[-8:-4], "little")
    return data[4 : len(data) - 8 - footer]


def test_parquet_parts_are_joined_by_their_row_groups_not_decoded(tmp_path: Path) -> None:
    tables = [table(0, 2000), table(2000, 1500, "virginica"), table(3500, 10)]
    paths = [write_part(tmp_path / f"part-{i}", t) for i, t in enumerate(tables)]
    later = [data_bytes(path) for path in paths[1:]]
    append_parts("parquet", paths[0], paths[1:], CHUNK_ROWS)

    joined = pq.ParquetFile(paths[0])
    assert joined.read().equals(pa.concat_tables(tables))
    assert joined.metadata.num_rows == 3510
    groups = [joined.metadata.row_group(i).num_rows for i in range(joined.num_row_groups)]
    assert groups == [700, 700, 600, 700, 700, 100, 10]  # each part's own groups, in order
    whole = paths[0].read_bytes()
    assert all(piece in whole for piece in later)  # copied as they were written
    # Statistics moved with their column chunks: a reader can still skip row groups.
    last = joined.metadata.row_group(6).column(0).statistics
    assert (last.min, last.max) == ("003500", "003509")


def test_joining_into_a_new_file_leaves_the_parts_as_they_are(tmp_path: Path) -> None:
    tables = [table(0, 800), table(800, 900)]
    paths = [write_part(tmp_path / f"part-{i}", t) for i, t in enumerate(tables)]
    before = [path.read_bytes() for path in paths]
    join_parts("parquet", paths, tmp_path / "result.parquet", CHUNK_ROWS)
    assert pq.read_table(tmp_path / "result.parquet").equals(pa.concat_tables(tables))
    assert [path.read_bytes() for path in paths] == before


def test_parts_of_other_types_are_cast_to_the_first_part_s(tmp_path: Path) -> None:
    first = pa.table({"id": pa.array([1, 2], pa.int64()), "x": pa.array([0.5, 1.5])})
    second = pa.table({"id": pa.array([3.0, 4.0]), "x": pa.array([2.5, 3.5])})
    paths = [write_part(tmp_path / "a", first), write_part(tmp_path / "b", second)]
    append_parts("parquet", paths[0], paths[1:], CHUNK_ROWS)
    joined = pq.read_table(paths[0])
    assert joined.schema == first.schema
    assert joined["id"].to_pylist() == [1, 2, 3, 4]

    third = pa.table({"id": pa.array(["A5"]), "x": pa.array([4.5])})
    paths = [write_part(tmp_path / "c", first), write_part(tmp_path / "d", third)]
    with pytest.raises(InvalidInput, match="column 'id' changed type from int64 to string"):
        append_parts("parquet", paths[0], paths[1:], CHUNK_ROWS)


@pytest.mark.parametrize("empty", [0, 1])
def test_a_part_without_rows_is_left_out(tmp_path: Path, empty: int) -> None:
    tables = [table(0, 300), table(300, 300)]
    paths = [write_part(tmp_path / f"part-{i}", t) for i, t in enumerate(tables)]
    paths[empty].write_bytes(b"")  # a worker that scored no rows writes nothing
    append_parts("parquet", paths[0], paths[1:], CHUNK_ROWS)
    assert pq.read_table(paths[0]).equals(tables[1 - empty])


def test_line_parts_are_joined_as_bytes(tmp_path: Path) -> None:
    pieces = [b"id,label\n1,a\n2,b\n", b"", b"3,c\n", b"4,d\n"]
    paths = [tmp_path / f"part-{i}" for i in range(len(pieces))]
    for path, piece in zip(paths, pieces, strict=True):
        path.write_bytes(piece)
    join_parts("csv", paths, tmp_path / "out.csv", CHUNK_ROWS)
    assert (tmp_path / "out.csv").read_bytes() == b"".join(pieces)
    append_parts("csv", paths[0], paths[1:], CHUNK_ROWS)
    assert paths[0].read_bytes() == b"".join(pieces)
