"""`/v1/jobs`: submit a batch job, watch it, fetch its result (with Range), cancel or delete it.

Every route runs inside the request boundary (credentials, request id, error mapping, access
line). A submitted body is streamed to disk as it arrives, counted against the jobs folder's
disk limit; the job is recorded only once its input is whole.
"""

import asyncio
import re
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import parse_qs

import orjson

from service import errors
from service.config import Settings
from service.jobs.estimate import estimate_rows
from service.jobs.runner import result_path
from service.jobs.store import STATES, Job, JobStore
from service.protocols.files import CONTENT_TYPES, format_of_media_type, format_of_path
from service.scoring.columns import ColumnTypes, check_declared, parse_column_types
from service.scoring.parts import input_columns
from service.scoring.tabular import check_columns
from service.server.auth import Identity, require_inference
from service.server.boundary import Answer, Exchange, Handler
from service.server.http import body_chunks, header, idle_bounded, read_body
from service.store.registry import ModelVersion

_JSON = [(b"content-type", b"application/json")]
_FORMATS = ("csv", "ndjson", "parquet")
_READ_BYTES = 1 << 20
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def describe(job: Job) -> dict[str, object]:
    """The job as GET /v1/jobs/{id} shows it, with rows/s and an ETA while it runs (from an
    estimated rows_total until the runner has counted the rows)."""
    body: dict[str, object] = {
        key: value
        for key, value in asdict(job).items()
        if key not in ("input_path", "owned_input", "heartbeat", "repository")
    }
    if not job.owned_input:
        body["input_path"] = job.input_path
    rate: float | None = None
    if job.started is not None and job.rows_done:
        rate = job.rows_done / max((job.finished or time.time()) - job.started, 1e-3)
    body["rows_per_s"] = rate
    eta = None
    if job.state == "running" and rate and job.rows_total is not None:
        eta = max(job.rows_total - job.rows_done, 0) / rate
    body["eta_s"] = eta
    body["result"] = f"/v1/jobs/{job.id}/result" if job.state == "succeeded" else None
    return body


def _query(exchange: Exchange) -> dict[str, str]:
    text = exchange.scope["query_string"].decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(text).items()}


def _store(exchange: Exchange) -> JobStore:
    store = exchange.state.jobs
    if store is None:
        folder = exchange.state.settings.jobs_folder()
        raise errors.Forbidden(
            f"batch jobs are off on this server: {folder} cannot be written; set "
            "MODELSERVE_JOBS_DIR to a writable folder (see the server log)"
        )
    return store


def _found(store: JobStore, job_id: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise errors.RouteNotFound(f"no job {job_id!r}; GET /v1/jobs lists the jobs kept")
    return job


def _caller(exchange: Exchange) -> Identity:
    if exchange.identity is None:  # the boundary sets it before any handler runs
        raise errors.ServiceError("the request's credentials were not checked")
    return exchange.identity


async def _job(exchange: Exchange, store: JobStore, job_id: str) -> Job:
    """The job, if the caller may call its model: a job is seen and handled with the scope
    that scoring its rows takes (`infer:<model>` or `modelserve:infer`)."""
    job = await asyncio.to_thread(_found, store, job_id)
    require_inference(_caller(exchange), job.model)
    return job


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise errors.InvalidInput(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _allowed_input(exchange: Exchange, text: object) -> Path:
    roots = exchange.state.settings.jobs_roots()
    if not roots:
        raise errors.Forbidden(
            "input_path is switched off: set MODELSERVE_JOBS_INPUT_ROOTS to the folders jobs may "
            "read, or send the file as the request body"
        )
    if not isinstance(text, str) or not text:
        raise errors.InvalidInput("input_path must be a path string")
    # Symlinks and `..` are resolved first, so neither can lead outside a root.
    path = Path(text).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        raise errors.Forbidden(
            f"input_path {text!r} is outside the allowed roots (MODELSERVE_JOBS_INPUT_ROOTS)"
        )
    if not path.is_file():
        raise errors.InvalidInput(f"input_path {text!r} is not a file")
    return path


def _check_input(
    model: ModelVersion,
    source: Path,
    input_format: str,
    column_types: ColumnTypes,
    settings: Settings,
) -> None:
    columns = input_columns(source, input_format, settings.max_row_bytes)
    if columns is not None:
        check_columns(model, columns)
        check_declared(column_types, columns)


def _remove_upload(source: Path) -> None:
    source.unlink(missing_ok=True)
    source.parent.rmdir()


async def _spool(exchange: Exchange, store: JobStore, target: Path) -> None:
    """The body to `target` as it arrives, refused once the jobs folder would pass its limit."""
    limit = exchange.state.settings.jobs_max_bytes
    used = await asyncio.to_thread(store.disk_use)
    declared = header(exchange.scope, b"content-length")
    if declared is not None and declared.isdigit() and used + int(declared) > limit:
        raise errors.StorageFull(
            f"a {declared}-byte input would take the jobs folder past its limit of {limit} bytes "
            f"({used} in use; MODELSERVE_JOBS_MAX_BYTES); delete finished jobs or retry later"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with target.open("wb") as out:
            idle_s = exchange.state.settings.body_idle_timeout_s
            async for data in body_chunks(idle_bounded(exchange.receive, idle_s)):
                written += len(data)
                if used + written > limit:
                    raise errors.StorageFull(
                        f"the input would take the jobs folder past its limit of {limit} bytes "
                        f"({used} in use; MODELSERVE_JOBS_MAX_BYTES); delete finished jobs "
                        "or retry later"
                    )
                await asyncio.to_thread(out.write, data)
    except BaseException:
        target.unlink(missing_ok=True)
        target.parent.rmdir()
        raise
    if written == 0:
        target.unlink()
        target.parent.rmdir()
        raise errors.InvalidInput("the request body is empty: send the file to score")


# What a submission names: in the query of an upload (whose format is its Content-Type), or in
# the JSON body of a file on the server's disk.
_UPLOAD_FIELDS = frozenset({"model", "version", "output_format", "on_error", "column_types"})
_PATH_FIELDS = _UPLOAD_FIELDS | {"input_path", "input_format"}


async def _submit(exchange: Exchange) -> Answer:
    store = _store(exchange)
    content_type = header(exchange.scope, b"content-type") or ""
    by_path = content_type.split(";", 1)[0].strip().lower() == "application/json"
    if by_path:
        raw = await read_body(exchange.scope, exchange.receive, 1 << 20)
        try:
            body = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidInput(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise errors.InvalidInput("the JSON body must be an object")
        fields = {k: v for k, v in body.items() if v is not None}
    else:
        fields = dict(_query(exchange))
    known = _PATH_FIELDS if by_path else _UPLOAD_FIELDS
    unknown = sorted(set(fields) - known)
    if unknown:
        # A misspelt option would otherwise be a job run with the default instead.
        where = "in the JSON body" if by_path else "in the query"
        raise errors.InvalidInput(
            f"unknown field {', '.join(map(repr, unknown))} {where}; the fields are "
            f"{', '.join(sorted(known))}"
        )
    name, version = fields.get("model"), fields.get("version")
    if not isinstance(name, str):
        raise errors.InvalidInput("name the model: ?model=NAME[&version=V] (or in the JSON body)")
    require_inference(_caller(exchange), name)  # before any of an upload is read
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
        raise errors.InvalidInput("version must be a version number or an alias name")
    model = exchange.model = exchange.state.router.resolve(
        name, None if version is None else str(version)
    )
    if by_path:
        source = _allowed_input(exchange, fields.get("input_path"))
        input_format = str(fields.get("input_format") or format_of_path(source) or "")
        _check_choice("input_format", input_format, _FORMATS)
    else:
        input_format = format_of_media_type(content_type)
    output_format = _check_choice(
        "output_format", str(fields.get("output_format", input_format)), _FORMATS
    )
    on_error = _check_choice("on_error", str(fields.get("on_error", "fail")), ("fail", "skip"))
    column_types = parse_column_types(str(fields.get("column_types", "")))
    job_id = store.new_id()
    if not by_path:
        source = store.job_folder(job_id) / f"input.{input_format}"
        if exchange.budget is not None:
            exchange.budget.reschedule(None)  # an upload is bounded by bytes, not by time
        await _spool(exchange, store, source)
    try:
        # What the runner would refuse at its start is refused now, while the client waits.
        await asyncio.to_thread(
            _check_input, model, source, input_format, column_types, exchange.state.settings
        )
    except errors.ServiceError:
        if not by_path:
            await asyncio.to_thread(_remove_upload, source)
        raise
    rows = await asyncio.to_thread(estimate_rows, source, input_format)
    rows_total, estimated = rows or (None, False)
    job = Job(
        job_id, "queued", model.name, model.version, str(source), not by_path,
        input_format, output_format, on_error, column_types, 0, rows_total, estimated, None,
        time.time(), None, None, None, None, 0,
    )  # fmt: skip
    await asyncio.to_thread(store.add, job)
    headers = [*_JSON, (b"location", f"/v1/jobs/{job_id}".encode())]
    return 202, orjson.dumps(describe(job)), headers


async def _list(exchange: Exchange) -> Answer:
    query = _query(exchange)
    state = query.get("state")
    if state is not None:
        _check_choice("state", state, STATES)
    limit_text = query.get("limit", "100")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
        raise errors.InvalidInput("limit must be a whole number from 1 to 1000")
    store = _store(exchange)
    model, caller, limit = query.get("model"), _caller(exchange), int(limit_text)
    if model is not None:
        require_inference(caller, model)
    # A caller scoped to some models sees their jobs only: all are read, theirs kept.
    every = model is not None or caller.may_infer(None)
    jobs = await asyncio.to_thread(store.find, state, model, limit if every else None)
    jobs = [job for job in jobs if caller.may_infer(job.model)][:limit]
    return 200, orjson.dumps({"jobs": [describe(job) for job in jobs]}), _JSON


def _status(job_id: str) -> Handler:
    async def handler(exchange: Exchange) -> Answer:
        job = await _job(exchange, _store(exchange), job_id)
        return 200, orjson.dumps(describe(job)), _JSON

    return handler


def _remove(job_id: str) -> Handler:
    async def handler(exchange: Exchange) -> Answer:
        store = _store(exchange)
        job = await _job(exchange, store, job_id)
        unfinished = job.state in ("queued", "running")
        if unfinished and await asyncio.to_thread(store.cancel, job_id):
            if job.state == "queued" and job.owned_input:
                Path(job.input_path).unlink(missing_ok=True)
            # A running job's runner sees the cancel at its next heartbeat, stops and
            # removes its parts.
            job = await asyncio.to_thread(_found, store, job_id)
            return 200, orjson.dumps(describe(job)), _JSON
        await asyncio.to_thread(store.delete, job_id)
        return 204, b"", []

    return handler


def _byte_range(text: str | None, size: int) -> tuple[int, int] | None:
    """The one range of a `Range: bytes=` header as (first, last); None for the whole file."""
    match = None if text is None else _RANGE.fullmatch(text.strip())
    if match is None:
        return None  # absent, or a form not served (several ranges): the whole file, as allowed
    first, last = match[1], match[2]
    if first:
        start, stop = int(first), min(int(last), size - 1) if last else size - 1
    elif last:
        start, stop = max(size - int(last), 0), size - 1
    else:
        return None
    if start >= size or start > stop:
        raise errors.RangeNotSatisfiable(
            f"the range {text!r} starts past the end of the {size}-byte result", size
        )
    return start, stop


def _result(job_id: str) -> Handler:
    async def handler(exchange: Exchange) -> None:
        store = _store(exchange)
        job = await _job(exchange, store, job_id)
        if job.state != "succeeded":
            raise errors.Conflict(
                f"job {job_id} is {job.state}: its result exists once it has succeeded"
                + (f" ({job.error})" if job.error else "")
            )
        path = result_path(store, job)
        size = path.stat().st_size
        wanted = _byte_range(header(exchange.scope, b"range"), size)
        start, stop = wanted or (0, size - 1)
        headers = [
            (b"content-type", CONTENT_TYPES[job.output_format].encode()),
            (b"accept-ranges", b"bytes"),
            (b"content-length", str(stop - start + 1).encode()),
        ]
        if wanted is not None:
            headers.append((b"content-range", f"bytes {start}-{stop}/{size}".encode()))
        await exchange.start(206 if wanted else 200, headers)
        with path.open("rb") as source:
            source.seek(start)
            remaining = stop - start + 1
            while remaining > 0:
                data = await asyncio.to_thread(source.read, min(_READ_BYTES, remaining))
                remaining -= len(data)
                more = remaining > 0 and bool(data)
                await exchange.send({"type": "http.response.body", "body": data, "more_body": more})
                if not data:
                    break
        exchange.rows = job.rows_done

    return handler


def jobs_handler(method: str, job_id: str | None, result: bool) -> Handler:
    """The handler of a /v1/jobs request, by method and path."""
    table: dict[tuple[str, bool, bool], Handler] = {
        ("POST", False, False): _submit,
        ("GET", False, False): _list,
    }
    if job_id is not None:
        table[("GET", True, False)] = _status(job_id)
        table[("DELETE", True, False)] = _remove(job_id)
        table[("GET", True, True)] = _result(job_id)
    handler = table.get((method, job_id is not None, result))
    if handler is not None:
        return handler
    allowed = sorted({m for (m, has_id, res) in table if has_id == (job_id is not None)})

    async def refuse(exchange: Exchange) -> Answer:
        raise errors.MethodNotAllowed(f"{method} is not allowed here; send {' or '.join(allowed)}")

    return refuse
