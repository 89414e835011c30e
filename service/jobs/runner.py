"""The job runner: claims jobs from the store and scores them part by part, off the event loop.

Each server worker runs one runner task. A job's input is split into parts (byte ranges at
line starts, or runs of Parquet row groups) once, and the plan is stored; each part is scored
by the offline scorer in a scoring process (jobs.parts) into its own file, renamed into place
when whole, then recorded. A job
claimed again after its owner died redoes only the parts not recorded, and the result is
joined from the parts in order and renamed into place: it appears only when complete.
"""

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor
from pathlib import Path

from service.config import Settings
from service.errors import InvalidInput, ServiceError
from service.jobs.parts import (
    Stopped,
    close_pool,
    new_pool,
    pool_broken,
    pool_size,
    score_parts,
)
from service.jobs.store import FINISHED, Job, JobStore, StoredPart, this_owner
from service.scoring import ModelReference, cached_model
from service.scoring.joining import join_parts
from service.scoring.parts import PartFailed, ScoreFile, Unsplittable, count_rows, plan_parts
from service.scoring.tabular import feature_names

logger = logging.getLogger(__name__)
_IDLE_S = 0.5
_CLEANUP_S = 60.0
_CHUNK_ROWS = 65536


def result_path(store: JobStore, job: Job) -> Path:
    return store.job_folder(job.id) / f"result.{job.output_format}"


def _score_file(settings: Settings, job: Job, target: Path, parts: int) -> ScoreFile:
    return ScoreFile(
        reference=ModelReference(str(settings.model_repository), job.model, job.version),
        source=Path(job.input_path),
        target=target,
        input_format=job.input_format,
        output_format=job.output_format,
        chunk_rows=_CHUNK_ROWS,
        workers=parts,
        on_error=job.on_error,
        column_types=job.column_types,
        max_row_bytes=settings.max_row_bytes,
    )


def _plan(store: JobStore, job: Job, spec: ScoreFile) -> list[StoredPart]:
    stored = store.parts(job.id)
    if stored:
        return stored
    planned = plan_parts(spec)
    first_rows, rows_total = count_rows(spec, planned)
    parts = [
        StoredPart(p.index, p.start, p.stop, first, p.columns, None)
        for p, first in zip(planned, first_rows, strict=True)
    ]
    store.plan(job.id, parts, rows_total)
    return parts


def run_job(
    store: JobStore,
    settings: Settings,
    pool: Executor,
    job: Job,
    owner: str,
    stopping: threading.Event,
) -> None:
    """Scores the parts of `job` not yet done, then joins them into the result."""
    folder = store.job_folder(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    size = Path(job.input_path).stat().st_size
    # At least one part per scoring process, so that a small file is scored in parallel too.
    count = max(pool_size(settings), size // settings.jobs_part_bytes)
    spec = _score_file(settings, job, result_path(store, job), count)
    model = cached_model(spec.reference)  # fails fast, before any process starts
    feature_names(model)
    parts = _plan(store, job, spec)
    if parts[0].columns is not None:
        spec.check_columns(model, parts[0].columns)
    try:
        rows = score_parts(store, pool, spec, job, parts, owner, stopping)
    except Unsplittable:
        # Quoted values span lines: one part, read following the quotes, is scored instead.
        parts = [StoredPart(0, parts[0].start, parts[-1].stop, 0, parts[0].columns, None)]
        store.plan(job.id, parts, (store.get(job.id) or job).rows_total or 0)
        rows = score_parts(store, pool, spec, job, parts, owner, stopping)
    if rows == 0:
        raise InvalidInput(f"the input of job {job.id} has no rows to score")
    joined = folder / f"result.{job.attempts}.partial"
    paths = [folder / f"part-{p.index}" for p in parts]
    join_parts(spec.output_format, paths, joined, spec.chunk_rows)
    os.replace(joined, result_path(store, job))
    for path in folder.glob("part-*"):  # stale partial files of a dead owner too
        path.unlink(missing_ok=True)


def _remove_files(store: JobStore, job: Job) -> None:
    """A cancelled or failed job's files: its result is never coming."""
    folder = store.job_folder(job.id)
    for path in folder.glob("part-*"):
        path.unlink(missing_ok=True)
    for path in folder.glob("result.*.partial"):
        path.unlink(missing_ok=True)
    if job.owned_input:
        Path(job.input_path).unlink(missing_ok=True)


def execute(
    store: JobStore,
    settings: Settings,
    pool: Executor,
    job: Job,
    owner: str,
    stopping: threading.Event,
) -> None:
    """Runs a claimed job to its end state (in a thread; its parts in the pool's processes)."""
    started = time.perf_counter()
    try:
        run_job(store, settings, pool, job, owner, stopping)
    except Stopped:
        now = store.get(job.id)
        if now is None:  # deleted: its files went with it
            logger.info("job %s stopped: deleted", job.id)
        elif now.state == "cancelled":
            _remove_files(store, job)
            logger.info("job %s stopped: cancelled", job.id)
        elif stopping.is_set():
            _hand_back(store, job, owner)
        else:  # its heartbeat went quiet and another worker took it over: its files are theirs
            logger.warning("job %s was taken over by %s", job.id, now and now.owner)
        return
    except BrokenExecutor:
        # A part's process died (killed: out of memory, or by hand). The pool is unusable; the
        # runner starts a new one for the next job.
        if stopping.is_set():
            _hand_back(store, job, owner)
        else:
            _fail(
                store,
                job,
                owner,
                "a scoring process died while scoring a part of this job "
                "(killed: out of memory?); see the server log",
            )
        raise
    except PartFailed as exc:
        _fail(store, job, owner, exc.message)
        return
    except ServiceError as exc:
        _fail(store, job, owner, exc.message)
        return
    except Exception as exc:  # the runner's boundary: the job fails, the runner goes on
        now = store.get(job.id)
        if now is None or now.state == "cancelled":
            # Cancelled or deleted while it was being read (its input may be gone with it):
            # that is the end the client asked for, not a failure.
            _remove_files(store, job)
            logger.info("job %s stopped: %s", job.id, "deleted" if now is None else "cancelled")
            return
        logger.exception("job %s failed", job.id)
        _fail(store, job, owner, f"internal error ({type(exc).__name__}); see the server log")
        return
    store.finish(job.id, owner, "succeeded")
    if job.owned_input:
        Path(job.input_path).unlink(missing_ok=True)
    logger.info("job %s succeeded in %.3f s", job.id, time.perf_counter() - started)


def _hand_back(store: JobStore, job: Job, owner: str, attempted: bool = True) -> None:
    """The job back to the queue, as the server stops: the next server resumes it."""
    store.release(job.id, owner, attempted)
    logger.info("job %s handed back to the queue: the server is stopping", job.id)


def _fail(store: JobStore, job: Job, owner: str, message: str) -> None:
    store.finish(job.id, owner, "failed", message)
    _remove_files(store, job)
    logger.info("job %s failed: %s", job.id, message)


def remove_expired(store: JobStore, retention_s: float) -> None:
    for job_id in store.expired(time.time() - retention_s):
        store.delete(job_id)
        logger.info("job %s removed: past its retention", job_id)


Recorder = Callable[[Job, float], None]  # a job in its end state, and its run's seconds


async def run_jobs(
    store: JobStore, settings: Settings, stopping: threading.Event, record: Recorder
) -> None:
    """The runner of one server worker: one job at a time, its parts in a pool of processes."""
    owner = this_owner()
    cleaned = 0.0
    pool: Executor | None = None  # started with the first job, kept warm after
    try:
        while not stopping.is_set():
            if time.monotonic() - cleaned > min(_CLEANUP_S, settings.jobs_retention_s / 2):
                cleaned = time.monotonic()
                await asyncio.to_thread(remove_expired, store, settings.jobs_retention_s)
            job = await asyncio.to_thread(store.claim, owner)
            if job is None:
                await asyncio.to_thread(stopping.wait, _IDLE_S)  # ends at once on a stop
                continue
            logger.info("job %s claimed (attempt %d)", job.id, job.attempts)
            if stopping.is_set():  # claimed as the server began to stop: no pool for it
                await asyncio.to_thread(_hand_back, store, job, owner, False)
                break
            if pool is not None and pool_broken(pool):
                # A process died between jobs (the OOM killer picks idle ones too): the next
                # job gets a new pool instead of failing on this one.
                await asyncio.to_thread(close_pool, pool, True)
                pool = None
            pool = pool or new_pool(settings)
            started = time.perf_counter()
            try:
                await asyncio.to_thread(execute, store, settings, pool, job, owner, stopping)
            except BrokenExecutor:
                await asyncio.to_thread(close_pool, pool, True)
                pool = None
            final = await asyncio.to_thread(store.get, job.id)
            if final is not None and final.state in FINISHED and final.owner == owner:
                record(final, time.perf_counter() - started)
    finally:
        if pool is not None:
            # Waited for, so that its processes and semaphores are gone before the server.
            await asyncio.to_thread(close_pool, pool, pool_broken(pool))
