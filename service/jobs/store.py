"""The job store: job records and their parts in SQLite (WAL), files in one folder per job.

Every server worker opens the same database; a job is claimed inside one write transaction,
so two workers never run it at once. A job records the model repository of the server it was
submitted to, and only a server of that repository claims it: servers of other repositories
that share the folder never score it with their own model of the same name. A running job's
owner (host and pid) refreshes a heartbeat; a job whose owner died (a dead pid on this host, or
a heartbeat gone quiet) is claimed again and resumes from the parts it had not finished.
"""

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# A heartbeat older than this marks its owner dead even where its pid cannot be checked.
STALE_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    input_path TEXT NOT NULL,
    owned_input INTEGER NOT NULL,
    input_format TEXT NOT NULL,
    output_format TEXT NOT NULL,
    on_error TEXT NOT NULL,
    column_types TEXT NOT NULL,
    rows_done INTEGER NOT NULL DEFAULT 0,
    rows_total INTEGER,
    rows_total_estimated INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    owner TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    repository TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
CREATE TABLE IF NOT EXISTS parts (
    job TEXT NOT NULL,
    idx INTEGER NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,
    first_row INTEGER NOT NULL,
    columns TEXT,
    rows INTEGER,
    progress INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, idx)
);
"""


@dataclass(frozen=True)
class Job:
    id: str
    state: str
    model: str
    version: int
    input_path: str
    owned_input: bool
    input_format: str
    output_format: str
    on_error: str
    column_types: dict[str, str]
    rows_done: int
    rows_total: int | None
    rows_total_estimated: bool  # rows_total is an estimate until the runner counts the rows
    error: str | None
    created: float
    started: float | None
    finished: float | None
    owner: str | None
    heartbeat: float | None
    attempts: int
    # The resolved model repository of the server that took the job; None in a job recorded
    # before the column existed, which any server may claim.
    repository: str | None = None


@dataclass(frozen=True)
class StoredPart:
    index: int
    start: int
    stop: int
    first_row: int
    columns: list[str] | None
    rows: int | None  # None until the part is done


def this_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str | None, heartbeat: float | None, now: float) -> bool:
    if owner is None or heartbeat is None or heartbeat < now - STALE_S:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's: only its heartbeat tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _job(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["owned_input"] = bool(values["owned_input"])
    values["rows_total_estimated"] = bool(values["rows_total_estimated"])
    values["column_types"] = json.loads(values["column_types"])
    return Job(**values)


def _columns(db: sqlite3.Connection) -> set[str]:
    return {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}


# Columns added since the first schema, with their definitions: a database written before
# them gets them when a server opens it.
_ADDED = {
    "rows_total_estimated": "INTEGER NOT NULL DEFAULT 0",
    "repository": "TEXT",
}


class JobStore:
    def __init__(self, folder: Path, repository: str | None = None) -> None:
        """`repository`: the server's resolved model repository, recorded on the jobs it adds;
        it claims only those (and jobs recorded without one). None: claims any job."""
        self.folder = folder
        self.repository = repository
        folder.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            if _ADDED.keys() <= _columns(db):
                return
        with self._write() as db:  # an older database: one worker adds the columns
            for name, definition in _ADDED.items():
                if name not in _columns(db):
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # One connection per call: callers are threads and processes alike.
        db = sqlite3.connect(self.folder / "jobs.sqlite3", timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def job_folder(self, job_id: str) -> Path:
        return self.folder / job_id

    def new_id(self) -> str:
        return uuid.uuid4().hex

    def add(self, job: Job) -> None:
        values = {
            **job.__dict__,
            "column_types": json.dumps(job.column_types),
            "repository": self.repository,
        }
        names = ", ".join(values)
        marks = ", ".join(f":{name}" for name in values)
        with self._write() as db:
            db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", values)

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def find(self, state: str | None, model: str | None, limit: int | None) -> list[Job]:
        """The newest jobs first, in `state` and of `model` where given; all with no limit."""
        query, args = "SELECT * FROM jobs WHERE 1 = 1", []
        if state is not None:
            query += " AND state = ?"
            args.append(state)
        if model is not None:
            query += " AND model = ?"
            args.append(model)
        query += " ORDER BY created DESC LIMIT ?"
        with self._connect() as db:
            rows = db.execute(query, [*args, -1 if limit is None else limit]).fetchall()
        return [_job(row) for row in rows]

    def count_by_state(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {row[0]: row[1] for row in rows}

    def claim(self, owner: str) -> Job | None:
        """The oldest queued job, or a running one whose owner died, now owned by `owner`."""
        now = time.time()
        query = "SELECT id, state, owner, heartbeat FROM jobs WHERE state IN ('queued', 'running')"
        args: tuple[str, ...] = ()
        if self.repository is not None:
            query += " AND (repository IS NULL OR repository = ?)"
            args = (self.repository,)
        with self._write() as db:
            rows = db.execute(f"{query} ORDER BY created", args).fetchall()
            for row in rows:
                if row["state"] == "running" and not _owner_is_dead(
                    row["owner"], row["heartbeat"], now
                ):
                    continue
                db.execute(
                    "UPDATE jobs SET state = 'running', owner = ?, heartbeat = ?, "
                    "attempts = attempts + 1, started = COALESCE(started, ?) WHERE id = ?",
                    (owner, now, now, row["id"]),
                )
                claimed = db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                return _job(claimed)
        return None

    def beat(self, job_id: str, owner: str, index: int | None = None, rows: int = 0) -> bool:
        """Refreshes the heartbeat (and a part's progress); False if the job is no longer ours."""
        with self._write() as db:
            if index is not None:
                db.execute(
                    "UPDATE parts SET progress = ? WHERE job = ? AND idx = ?", (rows, job_id, index)
                )
            changed = db.execute(
                "UPDATE jobs SET heartbeat = ?, rows_done = (SELECT COALESCE(SUM(COALESCE(rows, "
                "progress)), 0) FROM parts WHERE job = ?) "
                "WHERE id = ? AND owner = ? AND state = 'running'",
                (time.time(), job_id, job_id, owner),
            ).rowcount
        return changed == 1

    def release(self, job_id: str, owner: str, attempted: bool = True) -> None:
        """Back to the queue (this server is stopping); the next one resumes it. A job released
        as soon as it was claimed (`attempted` false) does not count that claim as an attempt."""
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL, attempts = attempts - ? "
                "WHERE id = ? AND owner = ? AND state = 'running'",
                (0 if attempted else 1, job_id, owner),
            )

    def finish(self, job_id: str, owner: str, state: str, error: str | None = None) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ? "
                "WHERE id = ? AND owner = ? AND state = 'running'",
                (state, error, time.time(), job_id, owner),
            )

    def cancel(self, job_id: str) -> bool:
        """Cancels a queued or running job; False if it had finished already."""
        with self._write() as db:
            changed = db.execute(
                "UPDATE jobs SET state = 'cancelled', finished = ?, "
                "error = 'cancelled by a DELETE request' "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (time.time(), job_id),
            ).rowcount
        return changed == 1

    def delete(self, job_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM parts WHERE job = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        shutil.rmtree(self.job_folder(job_id), ignore_errors=True)

    def parts(self, job_id: str) -> list[StoredPart]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT * FROM parts WHERE job = ? ORDER BY idx", (job_id,)
            ).fetchall()
        return [
            StoredPart(
                row["idx"],
                row["start"],
                row["stop"],
                row["first_row"],
                None if row["columns"] is None else json.loads(row["columns"]),
                row["rows"],
            )
            for row in rows
        ]

    def plan(self, job_id: str, parts: list[StoredPart], rows_total: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM parts WHERE job = ?", (job_id,))
            db.executemany(
                "INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, NULL, 0)",
                [
                    (
                        job_id,
                        p.index,
                        p.start,
                        p.stop,
                        p.first_row,
                        None if p.columns is None else json.dumps(p.columns),
                    )
                    for p in parts
                ],
            )
            db.execute(
                "UPDATE jobs SET rows_total = ?, rows_total_estimated = 0 WHERE id = ?",
                (rows_total, job_id),
            )

    def part_done(self, job_id: str, index: int, rows: int) -> int:
        """Records a finished part; returns the rows done (finished parts, and progress)."""
        with self._write() as db:
            db.execute("UPDATE parts SET rows = ? WHERE job = ? AND idx = ?", (rows, job_id, index))
            done: int = db.execute(
                "SELECT COALESCE(SUM(COALESCE(rows, progress)), 0) FROM parts WHERE job = ?",
                (job_id,),
            ).fetchone()[0]
            db.execute("UPDATE jobs SET rows_done = ? WHERE id = ?", (done, job_id))
        return done

    def expired(self, before: float) -> list[str]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT id FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') "
                "AND finished < ?",
                (before,),
            ).fetchall()
        return [row["id"] for row in rows]

    def disk_use(self) -> int:
        """Bytes under the jobs folder: inputs, parts, results and the database."""
        total = 0
        for root, _, files in os.walk(self.folder):
            for name in files:
                # A part may be renamed or removed while we count.
                with contextlib.suppress(FileNotFoundError):
                    total += (Path(root) / name).stat().st_size
        return total
