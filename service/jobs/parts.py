"""A job's parts scored in a pool of spawned processes, each part into its own file.

The processes load the model themselves (same checks as the server) and keep it for the next
part; they report progress and refresh the job's heartbeat straight into the store, and stop
at the next chunk once the job is no longer theirs (cancelled, handed back, taken over). They
die with their server, SIGKILL included, so a job never has two writers. With
MODELSERVE_JOBS_DASK_SCHEDULER set, the parts run on that Dask cluster's workers instead,
through the same executor interface.
"""

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from pathlib import Path

from service.config import Settings, usable_cores
from service.jobs.store import Job, JobStore, StoredPart
from service.scoring.parts import Part, PartFailed, ScoreFile, Unsplittable, score_part

_BEAT_S = 0.5
_PR_SET_PDEATHSIG = 1
Outcome = tuple[str, int, str]  # ("done", rows, ""), ("failed", 0, why), ("stopped", 0, why)


class Stopped(Exception):
    """The job was cancelled, claimed by another owner, or this server is stopping."""


class _PartProgress:
    """A part's progress and the heartbeat, at most every _BEAT_S."""

    def __init__(self, store: JobStore, job_id: str, owner: str, index: int) -> None:
        self.store, self.job_id, self.owner, self.index = store, job_id, owner, index
        self.rows = 0
        # The first chunk beats at once: a part that starts after its job was stopped (it was
        # already on its way to a process) ends at its first chunk, not half a second later.
        self.last = 0.0

    def __call__(self, rows: int, _consumed: int) -> None:
        self.rows += rows
        if time.monotonic() - self.last >= _BEAT_S:
            self.last = time.monotonic()
            if not self.store.beat(self.job_id, self.owner, self.index, self.rows):
                raise Stopped("the job was cancelled or handed back")


# Jobs are background work: on a busy machine the kernel gives online requests the CPU first
# (a nice-10 process gets about a tenth of what a nice-0 one gets when both want a core);
# on an idle machine a job runs as fast as before.
JOB_NICENESS = 10


def _prepare_process() -> None:
    # Ctrl-C, and a SIGTERM sent to the whole group (systemd's default), reach these processes
    # too: the server stops their parts itself (the job handed back, not failed by a dead pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.nice(max(0, JOB_NICENESS - os.nice(0)))


def _score_in_process(
    folder: Path, spec: ScoreFile, part: Part, path: Path, job_id: str, owner: str
) -> Outcome:
    store = JobStore(folder)
    try:
        rows = score_part(spec, part, path, _PartProgress(store, job_id, owner, part.index))
    except PartFailed as exc:  # its constructor takes two arguments, so it does not unpickle
        return "failed", 0, exc.message
    except Unsplittable:
        return "unsplittable", 0, ""
    except Stopped as exc:
        return "stopped", 0, str(exc)
    return "done", rows, ""


def pool_size(settings: Settings) -> int:
    """MODELSERVE_JOBS_PROCESSES, or one per core this server may run on."""
    return settings.jobs_processes or usable_cores()


def new_pool(settings: Settings) -> Executor:
    """Processes of this machine, or the workers of a Dask cluster when one is configured."""
    if settings.jobs_dask_scheduler:
        # Imported only when chosen: Dask is optional. The workers must see the model
        # repository and the jobs folder at the same paths (shared storage).
        from distributed import Client

        client = Client(settings.jobs_dask_scheduler, set_as_default=False)  # type: ignore[no-untyped-call]
        executor: Executor = client.get_executor(pure=False)  # type: ignore[no-untyped-call]
        return executor
    processes = pool_size(settings)
    # Spawned, not forked: the server's threads and event loop stay behind.
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(processes, mp_context=context, initializer=_prepare_process)


def partial_path(store: JobStore, job: Job, index: int) -> Path:
    # Named per attempt: a taken-over owner's last writes never land in the new owner's file.
    return store.job_folder(job.id) / f"part-{index}.{job.attempts}.partial"


def pool_broken(pool: Executor) -> bool:
    """Whether a process of the pool died (CPython marks the pool; it has no public accessor)."""
    return bool(getattr(pool, "_broken", False))


def close_pool(pool: Executor, broken: bool = False) -> None:
    """Stops the pool and waits for its processes (a Dask executor takes no cancel_futures)."""
    if isinstance(pool, ProcessPoolExecutor):
        if broken:
            # A process that died idle held the task queue's lock, so the others can never
            # take the stop sentinel, and they ignore the SIGTERM that CPython sends them
            # (_prepare_process): without this kill the wait below never ends.
            for process in list((pool._processes or {}).values()):
                process.kill()
        pool.shutdown(wait=True, cancel_futures=True)
    else:
        pool.shutdown(wait=True)


def _submit(
    store: JobStore,
    pool: Executor,
    spec: ScoreFile,
    job: Job,
    parts: list[StoredPart],
    owner: str,
) -> dict[Future[Outcome], int]:
    running: dict[Future[Outcome], int] = {}
    for stored in parts:
        if stored.rows is None:
            part = Part(stored.index, stored.start, stored.stop, stored.columns, stored.first_row)
            path = partial_path(store, job, part.index)
            future = pool.submit(_score_in_process, store.folder, spec, part, path, job.id, owner)
            running[future] = part.index
    return running


def _first_failure(
    failure: PartFailed | Unsplittable | None, kind: str, index: int, message: str
) -> PartFailed | Unsplittable | None:
    """What the job fails with: a part that found quoted values spanning lines overrides any
    failure (a part after it may have started inside such a value); else the first bad row in
    the file."""
    if kind == "unsplittable" and not isinstance(failure, Unsplittable):
        return Unsplittable(index)
    if kind == "failed" and (
        failure is None or (isinstance(failure, PartFailed) and index < failure.index)
    ):
        return PartFailed(index, message)
    return failure


def _cancel(running: dict[Future[Outcome], int]) -> None:
    """Parts not started yet never start (the ones already running stop at their heartbeat)."""
    for future in running:
        future.cancel()


def score_parts(
    store: JobStore,
    pool: Executor,
    spec: ScoreFile,
    job: Job,
    parts: list[StoredPart],
    owner: str,
    stopping: threading.Event,
) -> int:
    """Scores the parts not done; returns the rows of every part. Raises PartFailed, Stopped,
    or Unsplittable when a part found quoted values spanning lines (it overrides failures,
    which may come of a part starting inside such a value)."""
    folder = store.job_folder(job.id)
    running = _submit(store, pool, spec, job, parts, owner)
    failure: PartFailed | Unsplittable | None = None
    stop: Stopped | None = None
    rows_done = sum(p.rows or 0 for p in parts)
    while running:
        finished, _ = wait(running, timeout=_BEAT_S, return_when=FIRST_COMPLETED)
        # wait() counts a future cancelled before its executor picked it up as not done, and
        # an executor shut down with cancel_futures (the server stopping) never picks it up.
        finished |= {future for future in running if future.cancelled()}
        if stop is None and stopping.is_set():
            store.release(job.id, owner)  # the parts see it at their next heartbeat and stop
            stop = Stopped("the server is stopping")
            _cancel(running)
        elif stop is None and not store.beat(job.id, owner):
            stop = Stopped("the job was cancelled or handed back")
            _cancel(running)
        for future in finished:
            index = running.pop(future)
            kind, rows, message = ("cancelled", 0, "") if future.cancelled() else future.result()
            if kind == "done" and stop is None:
                os.replace(partial_path(store, job, index), folder / f"part-{index}")
                rows_done = store.part_done(job.id, index, rows)
            elif kind in ("failed", "unsplittable"):
                failure = _first_failure(failure, kind, index, message)
                _cancel(running)
            elif kind == "stopped" and stop is None:
                stop = Stopped(message)
    if stop is not None:
        raise stop
    if failure is not None:
        raise failure
    return rows_done
