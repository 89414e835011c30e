"""create_app(settings) -> the ASGI application: the one composition root of the HTTP service."""

import asyncio
import gc
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException

from service import __version__
from service.config import Settings, usable_cores
from service.errors import ServiceError
from service.jobs.runner import run_jobs
from service.jobs.store import Job, JobStore
from service.observability.drift import DriftWatch
from service.observability.exposition import (
    exposition_registry,
    multiprocess_directory,
    worker_exited,
)
from service.observability.metrics import JobStates, create_metrics, record_model
from service.observability.payloads import create_payload_log
from service.prediction.batching import inline_call_bound
from service.prediction.router import Router
from service.protocols.envelope import MAX_JSON_DEPTH
from service.server.access import AccessLogMiddleware
from service.server.allocator import give_back_when_quiet
from service.server.fastpath import InferenceMiddleware
from service.server.http import (
    BodyGuard,
    error_body,
    error_headers,
    framework_error,
    note_error,
    status_of,
)
from service.server.openapi import add_inference_paths
from service.server.polling import follow_routing, poll_repository, write_status
from service.server.rollout import router as rollout
from service.server.routes import router as routes
from service.server.shutdown import install_drain_hook
from service.server.state import ServiceState
from service.server.status_page import STATIC_URL, static_files
from service.server.status_page import router as status_page
from service.store.registry import Registry, load_registry

if TYPE_CHECKING:
    from service.server.grpc_service import GrpcServer

logger = logging.getLogger(__name__)


def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    note_error(request.scope, type(exc).__name__)
    headers = {k.decode(): v.decode() for k, v in error_headers(exc)}
    return Response(error_body(exc), status_code=status_of(exc), headers=headers)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    note_error(request.scope, "InvalidInput")
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return JSONResponse(
        {
            "error": f"{where}: {first.get('msg', 'invalid request')}",
            "type": "InvalidInput",
            "details": exc.errors(),
        },
        status_code=400,
    )


def _http_error(request: Request, exc: Exception) -> Response:
    """The framework's own errors, in the shape of every other error."""
    assert isinstance(exc, HTTPException)
    status, path = exc.status_code, request.url.path
    headers = dict(exc.headers or {})
    if status == 404:
        message = f"no endpoint at {path}; the API is described at /docs"
    elif status == 405:
        allowed = headers.get("Allow", "another method")
        message = f"{request.method} is not allowed on {path}; it answers {allowed}"
    elif isinstance(exc.__cause__, RecursionError):
        # FastAPI's JSON parser gives up on deep nesting with "error parsing the body".
        message = f"request JSON is nested more than {MAX_JSON_DEPTH} levels deep"
    else:
        message = str(exc.detail)
    headers["content-type"] = "application/json"
    error = framework_error(status, message)
    note_error(request.scope, type(error).__name__)
    return Response(error_body(error), status_code=status, headers=headers)


def _open_jobs(folder: Path, repository: Path) -> JobStore | None:
    """The job store; a folder that cannot be written turns batch jobs off, not the server."""
    try:
        store = JobStore(folder, str(repository.resolve()))
    except (OSError, sqlite3.Error) as exc:
        logger.error(
            "batch jobs are off: %s cannot be written (%s); set MODELSERVE_JOBS_DIR to a "
            "writable folder",
            folder,
            exc,
        )
        return None
    logger.info("batch jobs in %s", folder)
    return store


def _background_tasks(
    state: ServiceState, jobs: JobStore | None, jobs_stopping: threading.Event
) -> tuple["asyncio.Task[None] | None", list["asyncio.Task[None]"]]:
    """What every worker runs beside its requests: the job runner when jobs are on (stopped
    apart: it ends by itself), then the routing sync, the return of free memory after a burst,
    and repository polling, drift binning and the payload log when they are on."""
    settings, metrics = state.settings, state.metrics

    def record_job(job: Job, seconds: float) -> None:
        metrics.job_duration.labels(job.state).observe(seconds)
        if job.state == "succeeded":
            metrics.job_rows.labels(job.model, str(job.version)).inc(job.rows_done)

    runner = None
    if jobs is not None:
        runner = asyncio.create_task(run_jobs(jobs, settings, jobs_stopping, record_job))
    tasks = [asyncio.create_task(follow_routing(state, settings.routing_sync_s))]
    tasks.append(asyncio.create_task(give_back_when_quiet(state.memory)))
    if settings.repository_poll_s > 0:
        tasks.append(asyncio.create_task(poll_repository(state, settings.repository_poll_s)))
    if state.router.drift is not None:
        tasks.append(asyncio.create_task(state.router.drift.keep_fresh()))
    if state.router.payloads is not None:
        tasks.append(asyncio.create_task(state.router.payloads.run()))
    return runner, tasks


async def _stop_job_runner(runner: "asyncio.Task[None] | None", seconds: float) -> None:
    """Waits for the job runner to end by itself (a running job hands itself back within a
    heartbeat once `jobs_stopping` is set). A `--workers N` worker process ends, threads and
    all, as soon as its application has shut down (uvicorn raises SIGTERM again)."""
    if runner is None:
        return
    await asyncio.wait([runner], timeout=seconds)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


def create_app(settings: Settings) -> InferenceMiddleware:
    """The FastAPI application behind the inference fast path (its `.app`)."""
    registry = CollectorRegistry()
    metrics = create_metrics(registry)
    directory = multiprocess_directory()
    prometheus = exposition_registry(registry, directory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Not os.cpu_count(): a container limited to two cores of a large host would start a
        # thread per host core.
        cores = usable_cores()
        executor = ThreadPoolExecutor(max_workers=max(2, cores), thread_name_prefix="model")
        payloads = create_payload_log(settings, metrics)
        state = ServiceState(
            settings,
            metrics,
            prometheus,
            Router(
                Registry(),
                executor,
                metrics,
                settings.max_batch_rows,
                settings.max_queue_requests,
                settings.shadow_max_pending,
                DriftWatch(
                    metrics,
                    settings.drift_window_rows,
                    settings.drift_max_features,
                    settings.drift_window_s,
                )
                if settings.drift_window_rows
                else None,
                payloads,
                inline_call_bound(cores),
            ),
        )
        app.state.service = state
        # Built before the first request: a bad key file fails startup, not a request.
        await state.credentials.prepare()
        grpc_server: GrpcServer | None = None
        if settings.grpc_port:
            # Imported only when chosen: the generated messages register the protocol's names
            # in the process-wide protobuf pool, where a client's copy of them would clash.
            from service.server.grpc_service import start_grpc_server

            # Started before the models load, so probes hear "not ready" rather than nothing.
            grpc_server = await start_grpc_server(state)
        registry = await asyncio.to_thread(
            load_registry, settings.model_repository, settings.load_options()
        )
        for entry in registry.models.values():
            record_model(metrics, entry)
        state.router.registry = registry
        state.jobs = await asyncio.to_thread(
            _open_jobs, settings.jobs_folder(), settings.model_repository
        )
        jobs_stopping = threading.Event()
        # What startup built (the app, the models) lives as long as the process: frozen, it is
        # left out of every garbage collection that request garbage triggers. With it in, each
        # full collection walks every loaded tree and layer, and a 10,000-row JSON request
        # (tens of thousands of new lists) triggers several.
        gc.freeze()
        state.ready = True

        def start_draining() -> None:
            state.start_draining()
            if grpc_server is not None:
                grpc_server.drain()

        if grpc_server is not None:
            await grpc_server.set_serving(True)
        restore_signals = install_drain_hook(start_draining, settings.shutdown_delay_s)
        logger.info("serving %d models from %s", len(registry.models), settings.model_repository)
        write_status(state)
        job_states = None
        if state.jobs is not None:
            job_states = JobStates(state.jobs.count_by_state)
            prometheus.register(job_states)
        runner, watches = _background_tasks(state, state.jobs, jobs_stopping)
        try:
            yield
        finally:
            restore_signals()
            state.ready = False
            # A running job hands itself back to the queue at its next chunk.
            jobs_stopping.set()
            for watch in watches:
                watch.cancel()
            await _stop_job_runner(runner, settings.graceful_shutdown_s)
            if grpc_server is not None:
                # HTTP has drained by now; calls still running get the same grace period.
                await grpc_server.stop(settings.graceful_shutdown_s)
            await asyncio.gather(*watches, return_exceptions=True)
            if job_states is not None:
                prometheus.unregister(job_states)
            executor.shutdown(wait=True)
            if directory is not None:
                worker_exited(directory)

    # FastAPIOffline serves Swagger UI 5 (which renders the OpenAPI 3.1 FastAPI emits) at /docs
    # from assets in its package, so the docs need no CDN.
    app = FastAPIOffline(
        title="modelserve",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        static_url="/docs/static",
    )
    app.include_router(status_page)
    app.include_router(routes)
    app.mount(STATIC_URL, static_files(), name="status-static")
    app.include_router(rollout)
    # Guards the routes FastAPI serves; the fast path in front has its own bounds.
    app.add_middleware(
        BodyGuard, limit=settings.max_request_bytes, idle_s=settings.body_idle_timeout_s
    )
    # What the fast path does not serve goes through the access log.
    app.add_middleware(AccessLogMiddleware)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    add_inference_paths(app)
    return InferenceMiddleware(app)
