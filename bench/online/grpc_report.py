"""The report's gRPC section: each gRPC scenario beside the REST run it mirrors."""

from bench.online.results import MLSERVER, TIMES, Results, fmt, peer_of, ratio

# The REST body each gRPC message compares with: typed contents with JSON, raw with binary.
REST_BODY = {"contents": "json", "raw": "binary"}


def _grpc_single_table(r: Results) -> list[str]:
    lines = [
        "| model | server | c | req/s | p50 ms | p99 ms | server CPU µs/req | REST req/s "
        f"| CPU / REST's | {TIMES} MLServer gRPC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (artifact, server, c), record in sorted(
        r.grpc_single.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])
    ):
        cpu = ratio(record["cpu_us"], r.one(artifact, server, c, "cpu_us"))
        peer = ratio(record["rate"], r.grpc_one(peer_of(artifact), MLSERVER, c))
        lines.append(
            f"| {artifact} | {server} | {c} | {fmt(record['rate'])} "
            f"| {fmt(record['p50_ms'], 2)} | {fmt(record['p99_ms'], 2)} "
            f"| {fmt(record['cpu_us'])} | {fmt(r.one(artifact, server, c))} "
            f"| {fmt(cpu, 2)} | {fmt(peer, 2)} |"
        )
    return lines


def _grpc_bulk_table(r: Results) -> list[str]:
    lines = [
        "| model | rows/request | server | message | rows/s | p50 ms | REST body | REST rows/s "
        f"| {TIMES} REST | {TIMES} MLServer gRPC (same message) |",
        "|---|---:|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for (artifact, server, n, contents), record in sorted(r.grpc_bulk.items()):
        body = REST_BODY[contents]
        rest = r.rows(artifact, server, n, body)
        peer = r.grpc_rows(peer_of(artifact), MLSERVER, n, contents)
        lines.append(
            f"| {artifact} | {n:,} | {server} | {contents} | {fmt(record['rows_per_s'])} "
            f"| {fmt(record['p50_ms'], 1)} | {body} | {fmt(rest)} "
            f"| {fmt(ratio(record['rows_per_s'], rest), 2)} "
            f"| {fmt(ratio(record['rows_per_s'], peer), 2)} |"
        )
    return lines


def grpc_tables(r: Results) -> list[str]:
    if not (r.grpc_single or r.grpc_bulk):
        return []
    return [
        "## gRPC beside REST",
        "",
        "The same models, bodies and concurrency as above, as ModelInfer calls to the same "
        "server process, loaded by h2load from core 1 with one connection per outstanding call "
        "(as wrk keeps one request on each of its connections). Single rows travel as typed "
        "contents (fp32_contents, the analogue of JSON); large requests as typed contents and "
        "as raw_input_contents (the analogue of the binary extension). A gRPC error still "
        "answers HTTP 200, so each run also checks the server's own count of calls: every one "
        "answered OK (calls in flight when h2load stops are cancelled, not failed). MLServer "
        "serves the joblib versions only, so ONNX rows compare with its joblib numbers.",
        "",
        "### Single-row requests",
        "",
        *_grpc_single_table(r),
        "",
        "### Large requests (one connection)",
        "",
        *_grpc_bulk_table(r),
        "",
    ]
