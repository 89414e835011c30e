"""`:score`: a CSV, NDJSON or Parquet body streamed through the batcher and back, chunk by chunk.

The body is read as it arrives and cut into chunks of rows; each chunk is decoded, run
through the model version's batcher (the one online requests use) and sent back before the
next chunks are read, so memory stays bounded whatever the size of the file. The answer is
decided on the first chunk: a bad row there is a 400; a bad row later can only be reported
after the rows already sent, as a last line (CSV, NDJSON) or by cutting the response
(Parquet, whose footer then never arrives). Each chunk is scored by the chunk pipeline that
offline scoring uses, in a worker thread whose model calls go through the batcher.
"""

import asyncio
import logging
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qs

import orjson

from service import errors
from service.protocols.files import (
    CONTENT_TYPES,
    Chunk,
    Encoder,
    decode_csv,
    decode_ndjson,
    format_of_accept,
    format_of_media_type,
    make_encoder,
    open_parquet,
    parquet_chunks,
    parse_csv_header,
)
from service.protocols.lines import LineChunks
from service.scoring.chunks import score_chunk
from service.scoring.columns import (
    ColumnTypes,
    check_declared,
    job_column_types,
    parse_column_types,
)
from service.scoring.tabular import check_columns, feature_names
from service.server.boundary import Exchange
from service.server.http import (
    Receive,
    Scope,
    Send,
    body_chunks,
    header,
    idle_bounded,
    status_of,
)
from service.server.outbox import Outbox
from service.server.state import ServiceState
from service.store.registry import ModelVersion
from service.store.runtimes import Arrays, Prediction

logger = logging.getLogger(__name__)
DEFAULT_CHUNK_ROWS = 16384
_SPOOL_BYTES = 1 << 20
_OUTBOX_MEMORY_BYTES = 8 << 20
_OVERLOAD_PATIENCE_S = 60.0
_AHEAD = 2  # chunks decoded ahead of the one being scored: bounds memory, keeps cores busy


@dataclass(frozen=True)
class ScoreJob:
    model: ModelVersion
    input_format: str
    output_format: str
    on_error: str
    chunk_rows: int
    # Keeps state between chunks (CSV header written once, Parquet's writer).
    encoder: Encoder
    # The declared column types, and with them those every chunk is cast to.
    declared: ColumnTypes
    types: ColumnTypes
    max_row_bytes: int

    def check_columns(self, columns: list[str]) -> None:
        check_columns(self.model, columns)
        check_declared(self.declared, columns)


def _job(state: ServiceState, model: ModelVersion, scope: Scope) -> ScoreJob:
    features = feature_names(model)
    query = {k: v[-1] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}
    on_error = query.get("on_error", "fail")
    if on_error not in ("fail", "skip"):
        raise errors.InvalidInput("on_error must be 'fail' or 'skip'")
    limit = state.settings.max_batch_rows
    rows_text = query.get("chunk_rows", str(min(DEFAULT_CHUNK_ROWS, limit)))
    if not rows_text.isdigit() or not 1 <= int(rows_text) <= limit:
        raise errors.InvalidInput(f"chunk_rows must be a whole number from 1 to {limit}")
    input_format = format_of_media_type(header(scope, b"content-type"))
    output_format = format_of_accept(header(scope, b"accept"), input_format)
    declared = parse_column_types(query.get("column_types", ""))
    types = job_column_types(features, declared, input_format, output_format)
    return ScoreJob(
        model,
        input_format,
        output_format,
        on_error,
        int(rows_text),
        make_encoder(output_format),
        declared,
        types,
        state.settings.max_row_bytes,
    )


async def _line_chunks(job: ScoreJob, receive: Receive) -> AsyncIterator[Chunk]:
    csv = job.input_format == "csv"
    lines = LineChunks(job.chunk_rows, job.max_row_bytes, header=csv)
    columns: list[str] | None = None

    async def decode(block: bytes) -> Chunk:
        nonlocal columns
        if not csv:
            return await asyncio.to_thread(decode_ndjson, block)
        if columns is None:
            columns = parse_csv_header(lines.header or b"")
            job.check_columns(columns)
        return await asyncio.to_thread(decode_csv, block, columns)

    async for data in body_chunks(receive):
        for block in lines.feed(data):
            yield await decode(block)
    rest = lines.finish()
    if csv and columns is None:
        columns = parse_csv_header(lines.header or b"")
        job.check_columns(columns)
    if rest:
        yield await decode(rest)


async def _parquet_chunks(job: ScoreJob, receive: Receive) -> AsyncIterator[Chunk]:
    # Parquet's index is at the end of the file: the body goes to disk first, not to memory.
    with tempfile.TemporaryFile() as spool:
        pending: list[bytes] = []
        async for data in body_chunks(receive):
            pending.append(data)
            if sum(map(len, pending)) >= _SPOOL_BYTES:
                await asyncio.to_thread(spool.write, b"".join(pending))
                pending.clear()
        await asyncio.to_thread(spool.write, b"".join(pending))
        spool.seek(0)
        chunks = parquet_chunks(open_parquet(spool), job.chunk_rows)
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk


async def _read_ahead(
    job: ScoreJob, receive: Receive, queue: "asyncio.Queue[Chunk | BaseException | None]"
) -> None:
    source = _parquet_chunks if job.input_format == "parquet" else _line_chunks
    try:
        async for chunk in source(job, receive):
            await queue.put(chunk)
        await queue.put(None)
    except Exception as exc:  # handed to the scoring loop, which reports it
        await queue.put(exc)


async def _predict(state: ServiceState, model: ModelVersion, inputs: Arrays) -> Prediction:
    """Through the batcher; when its queue is full, a scoring job waits its turn, not fails."""
    pause = 0.01
    waited = 0.0
    while True:
        try:
            return await state.router.predict(model, inputs)
        except errors.Overloaded:
            if waited >= _OVERLOAD_PATIENCE_S:
                raise
        await asyncio.sleep(pause)
        waited += pause
        pause = min(pause * 2, 1.0)


async def _score_chunk(state: ServiceState, job: ScoreJob, chunk: Chunk, first_row: int) -> bytes:
    """One chunk scored and encoded in a worker thread, its model call made on this loop."""
    model = job.model
    if first_row == 0:
        job.check_columns(chunk.table.column_names)
    loop = asyncio.get_running_loop()

    def predict(inputs: Arrays) -> Prediction:
        return asyncio.run_coroutine_threadsafe(_predict(state, model, inputs), loop).result()

    table = await asyncio.to_thread(
        score_chunk, model, chunk, first_row, job.on_error, predict, job.types
    )
    return await asyncio.to_thread(job.encoder.encode, table)


def _trailer(output_format: str, exc: errors.ServiceError) -> bytes:
    if output_format == "ndjson":
        return orjson.dumps({"error": exc.message, "type": type(exc).__name__}) + b"\n"
    return f"#error: {exc.message}\n".encode()


async def _next(queue: "asyncio.Queue[Chunk | BaseException | None]") -> Chunk | None:
    item = await queue.get()
    if isinstance(item, BaseException):
        raise item
    return item


async def serve_score(exchange: Exchange) -> None:
    """The `:score` handler of the request boundary: always a streamed answer."""
    state = exchange.state
    key = header(exchange.scope, b"x-routing-key")
    model = exchange.model = state.router.resolve(*exchange.names, key)
    job = _job(state, model, exchange.scope)
    queue: asyncio.Queue[Chunk | BaseException | None] = asyncio.Queue(_AHEAD)
    receive = idle_bounded(exchange.receive, exchange.state.settings.body_idle_timeout_s)
    reader = asyncio.create_task(_read_ahead(job, receive, queue))
    try:
        await _respond(exchange, job, queue)
    finally:
        reader.cancel()


async def _deliver(outbox: Outbox, send: Send) -> None:
    while (data := await outbox.get()) is not None:
        await send({"type": "http.response.body", "body": data, "more_body": True})


async def _respond(
    exchange: Exchange, job: ScoreJob, queue: "asyncio.Queue[Chunk | BaseException | None]"
) -> None:
    """Starts the answer once the first chunk scored, then streams the rest."""
    state = exchange.state
    chunk = await _next(queue)
    if chunk is None:
        raise errors.InvalidInput("the body has no rows to score")
    body = await _score_chunk(state, job, chunk, 0)
    content_type = CONTENT_TYPES[job.output_format].encode()
    await exchange.start(200, [(b"content-type", content_type)])
    outbox = Outbox(_OUTBOX_MEMORY_BYTES)
    await outbox.put(body)
    writer = asyncio.create_task(_deliver(outbox, exchange.send))
    exchange.rows = chunk.table.num_rows
    try:
        try:
            while (chunk := await _next(queue)) is not None:
                await outbox.put(await _score_chunk(state, job, chunk, exchange.rows))
                exchange.rows += chunk.table.num_rows
                if writer.done():  # the client went away
                    break
            await outbox.put(job.encoder.close())
        except Exception as exc:  # the response has started: only the end of it can tell
            if not isinstance(exc, errors.ServiceError):
                logger.exception("scoring %s failed after %d rows", job.model.name, exchange.rows)
                exc = errors.ServiceError("internal error; see the server log")
            logger.info("scoring %s stopped after %d rows: %s", job.model.name, exchange.rows, exc)
            exchange.outcome, exchange.error = status_of(exc), type(exc).__name__
            if job.output_format == "parquet":
                # Returning before the body is complete makes the server cut the connection:
                # the missing footer tells the client the file is incomplete.
                writer.cancel()
                return
            await outbox.put(_trailer(job.output_format, exc))
        outbox.close()
        await writer
    finally:
        outbox.discard()
    await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})
