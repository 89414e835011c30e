"""`modelserve score`: a file scored offline by worker processes, each over its own part.

Nothing reads the file but the workers (parts.py plans the parts). Each worker streams its part
chunk by chunk into a part file and reports progress; the parts are joined in order at the end
(joining.py), so OUTPUT only appears once every row is scored. A file whose quoted values
span lines is scored again as one part, read following the quotes.
"""

import importlib.abc
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path
from queue import Empty
from typing import Any

import pyarrow as pa

from service.errors import InvalidInput
from service.scoring import cached_model, joining
from service.scoring.parts import (
    Part,
    PartFailed,
    Report,
    ScoreFile,
    Unsplittable,
    plan_parts,
    score_part,
)
from service.scoring.progress import ProgressBar
from service.scoring.tabular import feature_names

logger = logging.getLogger(__name__)


def _worker(job: ScoreFile, part: Part, path: Path, queue: Any) -> None:
    # Ctrl-C reaches the whole process group: the parent stops the workers and cleans up, so
    # a worker does not print a KeyboardInterrupt traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's unwinds; a worker just stops
    skip_pandas()  # a spawned worker starts afresh

    def report(rows: int, consumed: int) -> None:
        queue.put(("progress", part.index, rows, consumed))

    try:
        rows = score_part(job, part, path, report)
    except PartFailed as exc:
        queue.put(("failed", part.index, exc.message, 0))
        return
    except Unsplittable:
        queue.put(("unsplittable", part.index, 0, 0))
        return
    except Exception as exc:  # the worker boundary: the parent reports it and stops
        logger.exception("scoring part %d failed", part.index)
        queue.put(("failed", part.index, f"{type(exc).__name__}: {exc}", 0))
        return
    queue.put(("done", part.index, rows, 0))


class _Workers:
    """One process per part; on a failure, the parts after it stop and the ones before finish,
    so the error reported is the first one in the file. A part that finds quoted values
    spanning lines stops them all (`unsplittable`): the file is to be scored as one part."""

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
        self.unsplittable = False

    def waiting(self) -> list[int]:
        if self.unsplittable:
            return []
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
                elif kind == "unsplittable":
                    self.unsplittable = True
                else:
                    self.fail(PartFailed(index, value))
        finally:
            for process in self.processes.values():
                if process.is_alive():
                    process.terminate()
                process.join()
        return sum(self.rows.values())


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


def _score_alone(
    job: ScoreFile, part: Part, path: Path, report: Report, quoted: bool = False
) -> int:
    try:
        return score_part(job, part, path, report, quoted)
    except PartFailed as exc:
        raise InvalidInput(exc.message) from None


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
            rows = _score_alone(job, parts[0], paths[0], bar.advance)
        else:
            workers = _Workers(job, parts, folder)
            rows = workers.run(bar)
            if workers.unsplittable:
                bar.restart()
                whole = Part(0, parts[0].start, parts[-1].stop, parts[0].columns, 0)
                rows = _score_alone(job, whole, paths[0], bar.advance, quoted=True)
                paths = paths[:1]
            elif workers.failed is not None:
                raise InvalidInput(workers.failed.message)
        if rows == 0:
            raise InvalidInput(f"{job.source} has no rows to score")
        # The first part becomes OUTPUT: the others are appended to it, it is not copied.
        joining.append_parts(job.output_format, paths[0], paths[1:], job.chunk_rows)
        os.replace(paths[0], target)
    bar.close()
    return rows
