"""The rows of a job's input before it is counted, and a jobs database of an earlier release."""

import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.jobs.estimate import estimate_rows
from service.jobs.store import Job, JobStore


def lines(count: int, width: int = 40) -> bytes:
    return b"".join(b"%07d," % i + b"x" * (width - 9) + b"\n" for i in range(count))


def test_a_parquet_footer_gives_the_exact_count(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"a": range(12_345)}), path, row_group_size=1000)
    assert estimate_rows(path, "parquet") == (12_345, False)


@pytest.mark.parametrize(("input_format", "header"), [("csv", b"id,text\n"), ("ndjson", b"")])
def test_a_big_file_is_estimated_from_its_size_and_first_lines(
    tmp_path: Path, input_format: str, header: bytes
) -> None:
    path = tmp_path / f"rows.{input_format}"
    path.write_bytes(header + lines(200_000))  # 8 MB, of which the first MiB is read
    rows, estimated = estimate_rows(path, input_format) or (0, False)
    assert estimated
    assert rows == pytest.approx(200_000, rel=0.001)


def test_a_small_file_is_counted_whole_with_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_bytes(b"id,text\n" + lines(99) + b"99,last")
    assert estimate_rows(path, "csv") == (100, True)


def test_an_unreadable_input_has_no_estimate(tmp_path: Path) -> None:
    (tmp_path / "rows.parquet").write_bytes(b"not parquet")
    assert estimate_rows(tmp_path / "rows.parquet", "parquet") is None
    assert estimate_rows(tmp_path / "missing.csv", "csv") is None


def test_a_database_without_the_estimate_column_gets_it(tmp_path: Path) -> None:
    database = sqlite3.connect(tmp_path / "jobs.sqlite3")
    database.execute(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, model TEXT NOT NULL, "
        "version INTEGER NOT NULL, input_path TEXT NOT NULL, owned_input INTEGER NOT NULL, "
        "input_format TEXT NOT NULL, output_format TEXT NOT NULL, on_error TEXT NOT NULL, "
        "column_types TEXT NOT NULL, rows_done INTEGER NOT NULL DEFAULT 0, rows_total INTEGER, "
        "error TEXT, created REAL NOT NULL, started REAL, finished REAL, owner TEXT, "
        "heartbeat REAL, attempts INTEGER NOT NULL DEFAULT 0)"
    )
    database.execute(
        "INSERT INTO jobs (id, state, model, version, input_path, owned_input, input_format, "
        "output_format, on_error, column_types, rows_total, created) "
        "VALUES ('old', 'queued', 'iris', 2, '/in.csv', 1, 'csv', 'csv', 'fail', '{}', 7, 1.0)"
    )
    database.commit()
    database.close()
    store = JobStore(tmp_path, "/srv/models")
    old = store.get("old")
    assert old is not None
    assert (old.rows_total, old.rows_total_estimated, old.repository) == (7, False, None)
    # Recorded before jobs named their repository: any server may run it.
    claimed = store.claim("here:1")
    assert claimed is not None
    assert claimed.id == "old"


def test_a_job_is_claimed_only_by_a_server_of_its_repository(tmp_path: Path) -> None:
    mine, theirs = JobStore(tmp_path, "/srv/models"), JobStore(tmp_path, "/srv/other")
    job = Job(
        mine.new_id(), "queued", "iris", 2, "/in.csv", True, "csv", "csv", "fail", {}, 0, 7,
        False, None, 1.0, None, None, None, None, 0,
    )  # fmt: skip
    mine.add(job)
    assert theirs.claim("there:1") is None
    claimed = mine.claim("here:1")
    assert claimed is not None
    assert (claimed.id, claimed.repository) == (job.id, "/srv/models")
