"""python -m bench.online [--peers]: measure, then write bench/results/online.md and .png."""

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.online.grpc_runs import (
    check_grpc_answers,
    grpc_large_requests,
    grpc_pair,
    grpc_single_rows,
)
from bench.online.raw import bare_call, load_runtime, measure_raw, seconds_per_call
from bench.online.report import write_report
from bench.online.results import (
    MLSERVER,
    MLSERVER_AB,
    OURS,
    OURS_UNBATCHED,
    TRITON,
    TUTORIAL,
)
from bench.online.servers import (
    ROOT,
    Server,
    prepare_repository,
    start_mlserver,
    start_modelserve,
    start_triton,
    start_tutorial,
)
from bench.online.workload import (
    ARTIFACTS,
    BULK_ROWS,
    CONCURRENCY,
    LARGE_ONLY_ARTIFACTS,
    WARM_UP_S,
    Artifact,
    Encoding,
    build_request,
    decode_answer,
)
from bench.online.workload import features as make_features
from bench.online.wrk import run_wrk
from service.store.runtimes import RuntimeOptions

# Measured over gRPC too (the variants differ in batching or adaptive batching only).
GRPC_SERVERS = (OURS, MLSERVER)
# The REST runs the gRPC targets compare with, which a --grpc-only run measures beside gRPC:
# iris ONNX single rows at c=64 (JSON), and iris 10,000-row requests (binary).
GRPC_TARGET_SINGLE = Artifact("iris", 2)
GRPC_TARGET_LARGE = (Artifact("iris", 1), Artifact("iris", 2))
RAW_SECONDS = 1.0
Record = dict[str, Any]


@contextmanager
def pinned(cores: set[int]) -> Iterator[None]:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def measure_raw_calls(repository: Path, artifact: Artifact, rep: int) -> list[Record]:
    """Raw calls on the server's core; ONNX also with two intra-op threads on both cores."""
    records: list[Record] = []
    for rows in (1, *BULK_ROWS):
        with pinned({0}):
            rates = measure_raw(repository, artifact, rows, RuntimeOptions(), RAW_SECONDS)
        records.append(
            {"kind": "raw", "rep": rep, "artifact": artifact.label, "rows": rows, **rates}
        )
        if artifact.format != "onnx":
            continue
        for threads in (1, 2):
            with pinned({0, 1}):
                options = RuntimeOptions(onnx_intra_op_threads=threads)
                rate = measure_raw(repository, artifact, rows, options, RAW_SECONDS)["runtime"]
            records.append(
                {
                    "kind": "onnx_threads",
                    "rep": rep,
                    "artifact": artifact.label,
                    "rows": rows,
                    "threads": threads,
                    "rows_per_s": rate,
                }
            )
    return records


def check_answers(server: Server, repository: Path) -> None:
    """One full decode per request type: labels equal and probabilities close to the raw call."""
    for artifact in ARTIFACTS + LARGE_ONLY_ARTIFACTS:
        if not server.serves(artifact):
            continue
        runtime = load_runtime(repository, artifact, RuntimeOptions())
        for rows in (1, 1_000):
            data = make_features(artifact.model, rows)
            expected = runtime.predict({"input": data}).outputs
            labels = [str(v) for v in expected["label"]]
            encodings: list[Encoding] = ["json", "binary"] if server.binary else ["json"]
            for encoding in encodings:
                request = build_request(server.kind, artifact, data, labels[0], encoding)
                response = httpx.post(
                    server.url + request.path,
                    content=request.body,
                    headers=_headers(request.content_type, request.header_length),
                    timeout=60.0,
                )
                response.raise_for_status()
                answer = decode_answer(
                    server.kind,
                    response.content,
                    response.headers.get("inference-header-content-length"),
                    expected["probabilities"].shape[1],
                )
                if answer.labels != labels or not np.allclose(
                    answer.probabilities, expected["probabilities"], atol=1e-4
                ):
                    raise RuntimeError(f"{server.name} answers {artifact.label} wrongly")


def _headers(content_type: str, header_length: int | None) -> dict[str, str]:
    headers = {"content-type": content_type}
    if header_length is not None:
        headers["inference-header-content-length"] = str(header_length)
    return headers


def _first_label(repository: Path, artifact: Artifact) -> str:
    runtime = load_runtime(repository, artifact, RuntimeOptions())
    return str(runtime.predict({"input": make_features(artifact.model, 1)}).outputs["label"][0])


def _single_rows(
    server: Server,
    artifact: Artifact,
    label: str,
    rep: int,
    seconds: float,
    concurrency: tuple[int, ...] = CONCURRENCY,
) -> Iterator[Record]:
    request = build_request(server.kind, artifact, make_features(artifact.model, 1), label, "json")
    run_wrk(server, request, max(concurrency), WARM_UP_S)  # warm-up, discarded
    for connections in concurrency:
        load = run_wrk(server, request, connections, seconds)
        yield load.single_row_record("single", rep, artifact.label, server.name, connections)


def _batching_pair(on: Server, off: Server, artifact: Artifact, label: str, rep: int) -> Record:
    """c=1 p50 with batching on and off: the medians of six 1 s runs each, on, off, off, on, ...

    The single-row runs of the two servers lie seconds apart, and at c=1 a p50 of well under
    a millisecond drifts by tens of percent over such gaps on a shared machine; in short
    mirrored runs a drift falls on both sides alike, and a median drops an odd slow second.
    """
    request = build_request("modelserve", artifact, make_features(artifact.model, 1), label, "json")
    p50: dict[str, list[float]] = {on.name: [], off.name: []}
    for server in (on, off, off, on) * 3:
        p50[server.name].append(run_wrk(server, request, 1, 1.0).p50_ms)
    on_ms, off_ms = statistics.median(p50[on.name]), statistics.median(p50[off.name])
    return {
        "kind": "batching_pair",
        "rep": rep,
        "artifact": artifact.label,
        "on_p50_ms": on_ms,
        "off_p50_ms": off_ms,
        "ratio": on_ms / off_ms,
    }


def _large_requests(
    server: Server,
    artifact: Artifact,
    label: str,
    rep: int,
    seconds: float,
    sizes: tuple[int, ...] = BULK_ROWS,
    only_binary: bool = False,
) -> Iterator[Record]:
    encodings: list[Encoding] = ["json", "binary"] if server.binary else ["json"]
    if only_binary:
        encodings = [e for e in encodings if e == "binary"]
    warm = False
    for rows in sizes:
        data = make_features(artifact.model, rows)
        for encoding in encodings:
            request = build_request(server.kind, artifact, data, label, encoding)
            if not warm:
                warm = bool(run_wrk(server, request, 1, WARM_UP_S))  # warm-up, discarded
            load = run_wrk(server, request, 1, seconds)
            yield {
                "kind": "bulk",
                "rep": rep,
                "artifact": artifact.label,
                "server": server.name,
                "rows": rows,
                "encoding": encoding,
                "rows_per_s": load.rate * rows,
                "p50_ms": load.p50_ms,
            }


# The 10,000-row binary targets' artifacts, each with its share of the raw call in paired runs.
SHARE_TARGETS = (
    Artifact("iris", 1),
    Artifact("iris", 2),
    Artifact("iris_int", 1),
    Artifact("iris_int", 2),
)
SHARE_RUN_S = 1.0


def _share_pair(
    server: Server, repository: Path, artifact: Artifact, label: str, rep: int
) -> Record:
    """10,000-row binary rows/s against the raw call's (predict + predict_proba, or
    session.run) on the server's core, in mirrored 1 s runs: raw, served, served, raw, ...

    The raw table's calls and the large-request runs lie a minute or more apart, and over
    such gaps a shared machine's speed drifts by tens of percent (one run's raw session for
    iris_int read 16.0, 19.8 and 20.4 M rows/s in its three repetitions); in short mirrored
    runs a drift falls on both sides alike.
    """
    rows = 10_000
    data = make_features(artifact.model, rows)
    request = build_request(server.kind, artifact, data, label, "binary")
    bare = bare_call(repository, artifact, data, RuntimeOptions())
    assert bare is not None, artifact  # SHARE_TARGETS are joblib and ONNX versions
    raw = bare[1]
    sides: dict[str, list[float]] = {"raw": [], "served": []}
    for side in ("raw", "served", "served", "raw") * 3:
        if side == "raw":
            with pinned({0}):
                sides[side].append(rows / seconds_per_call(raw, SHARE_RUN_S))
        else:
            sides[side].append(run_wrk(server, request, 1, SHARE_RUN_S).rate * rows)
    raw_rate, served = statistics.median(sides["raw"]), statistics.median(sides["served"])
    return {
        "kind": "share_pair",
        "rep": rep,
        "artifact": artifact.label,
        "raw": raw_rate,
        "served": served,
        "ratio": served / raw_rate,
    }


@dataclass(frozen=True)
class Scope:
    """What one run measures, of every scenario."""

    seconds: float
    large_only: bool = False
    grpc_only: bool = False  # gRPC, and only the REST runs its targets compare with


def _single_row_runs(
    order: list[Server], artifact: Artifact, label: str, rep: int, scope: Scope
) -> Iterator[Record]:
    """REST, then gRPC, then the batching pair, on every server serving the artifact."""
    if scope.large_only or artifact not in ARTIFACTS:
        return
    for server in (s for s in order if s.serves(artifact)):
        if not scope.grpc_only:
            yield from _single_rows(server, artifact, label, rep, scope.seconds)
        elif server.name == OURS and artifact == GRPC_TARGET_SINGLE:
            yield from _single_rows(server, artifact, label, rep, scope.seconds, (64,))
    for server in (s for s in order if s.name in GRPC_SERVERS and s.serves(artifact)):
        yield from grpc_single_rows(server, artifact, rep, scope.seconds)
    named = {s.name: s for s in order}
    if artifact == GRPC_TARGET_SINGLE and OURS in named:
        yield grpc_pair(named[OURS], artifact, label, rep, 1)
    if artifact.model == "iris" and OURS in named and OURS_UNBATCHED in named:
        yield _batching_pair(named[OURS], named[OURS_UNBATCHED], artifact, label, rep)


def _large_runs(
    order: list[Server], artifact: Artifact, label: str, rep: int, scope: Scope
) -> Iterator[Record]:
    """REST, then gRPC, on every server serving the artifact that takes large requests."""
    large = [s for s in order if s.serves(artifact) and s.large_requests]
    for server in large:
        if not scope.grpc_only:
            yield from _large_requests(server, artifact, label, rep, scope.seconds)
        elif server.name == OURS and artifact in GRPC_TARGET_LARGE:
            yield from _large_requests(server, artifact, label, rep, scope.seconds, (10_000,), True)
    for server in (s for s in large if s.name in GRPC_SERVERS):
        yield from grpc_large_requests(server, artifact, rep, scope.seconds)
        if server.name == OURS and artifact in GRPC_TARGET_LARGE:
            yield grpc_pair(server, artifact, label, rep, 10_000)


def measure_servers(
    servers: list[Server], repository: Path, repeat: int, scope: Scope
) -> list[Record]:
    """Every scenario on every server that serves it, interleaved, `repeat` times."""
    records: list[Record] = []
    artifacts = ARTIFACTS + LARGE_ONLY_ARTIFACTS
    labels = {a: _first_label(repository, a) for a in artifacts}
    for rep in range(repeat):
        # Each repetition starts with another server, so no server always runs first.
        order = servers[rep % len(servers) :] + servers[: rep % len(servers)]
        for artifact in artifacts:
            if not scope.grpc_only:
                # The raw calls too, right before the servers, so they share the machine's noise.
                records += measure_raw_calls(repository, artifact, rep)
            for runs in (_single_row_runs, _large_runs):
                for record in runs(order, artifact, labels[artifact], rep, scope):
                    records.append(record)
                    print(json.dumps(record), flush=True)
            ours = next((s for s in order if s.name == OURS), None)
            if ours is not None and artifact in SHARE_TARGETS and not scope.grpc_only:
                record = _share_pair(ours, repository, artifact, labels[artifact], rep)
                records.append(record)
                print(json.dumps(record), flush=True)
    return records


def measure_workers(repository: Path, work: Path, repeat: int, seconds: float) -> list[Record]:
    """`--workers 1` against `--workers 2`, server and wrk sharing both cores."""
    records: list[Record] = []
    artifact = Artifact("iris", 2)
    data = make_features("iris", 1)
    label = _first_label(repository, artifact)
    for rep in range(repeat):
        for workers in (1, 2):
            server = start_modelserve(
                f"modelserve-workers-{workers}", repository, work, cores="0,1", workers=workers
            )
            try:
                request = build_request("modelserve", artifact, data, label, "json")
                run_wrk(server, request, 64, 1.0, cores="0,1")  # warm every worker
                load = run_wrk(server, request, 64, seconds, cores="0,1")
            finally:
                server.stop()
            busy = load.cpu_us_per_request * load.rate / 1e6
            records.append(
                {
                    "kind": "workers",
                    "rep": rep,
                    "workers": workers,
                    "rate": load.rate,
                    "cores": busy,
                }
            )
            print(json.dumps(records[-1]), flush=True)
    return records


def start_servers(
    batched: Path,
    unbatched: Path,
    work: Path,
    peers: bool,
    only: list[str] | None,
    large_only: bool = False,
    grpc_only: bool = False,
) -> list[Server]:
    starts: dict[str, Callable[[], Server]] = {OURS: lambda: start_modelserve(OURS, batched, work)}
    if not (large_only or grpc_only):  # it differs only in batching, which these do without
        starts[OURS_UNBATCHED] = lambda: start_modelserve(
            OURS_UNBATCHED, unbatched, work, large_requests=False
        )
    if peers:
        starts |= {
            MLSERVER: lambda: start_mlserver(MLSERVER, batched, work, adaptive_batching=False),
            MLSERVER_AB: lambda: start_mlserver(MLSERVER_AB, batched, work, adaptive_batching=True),
            TUTORIAL: lambda: start_tutorial(TUTORIAL, batched, work),
            TRITON: lambda: start_triton(TRITON, batched, work),
        }
    if grpc_only:
        starts = {name: start for name, start in starts.items() if name in GRPC_SERVERS}
    unknown = set(only or ()) - starts.keys()
    if unknown:
        known = ", ".join(repr(name) for name in starts)
        raise SystemExit(f"--only {sorted(unknown)}: not among the servers of this run ({known})")
    servers: list[Server] = []
    try:
        for name, start in starts.items():
            if not only or name in only:
                servers.append(start())
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.online", description=__doc__)
    parser.add_argument(
        "--peers", action="store_true", help="also measure MLServer, FastAPI and Triton"
    )
    parser.add_argument("--repeat", type=int, default=2, help="repetitions (medians reported)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each load run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--skip-workers", action="store_true", help="skip the 1 vs 2 workers run")
    parser.add_argument(
        "--only",
        action="append",
        metavar="SERVER",
        help="run only this server (repeatable; a name as in the report, e.g. Triton)",
    )
    parser.add_argument(
        "--large-only",
        action="store_true",
        help="measure only the large requests and the raw calls (no single rows, no workers)",
    )
    parser.add_argument(
        "--grpc-only",
        action="store_true",
        help="measure only gRPC (h2load), and the REST runs its targets compare with",
    )
    args = parser.parse_args()
    work = ROOT / "bench" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    batched, unbatched = prepare_repository(work)
    started = time.time()
    records: list[Record] = []
    servers = start_servers(
        batched, unbatched, work, args.peers, args.only, args.large_only, args.grpc_only
    )
    try:
        with pinned({1}):
            for server in servers:
                check_answers(server, batched)
                if server.name in GRPC_SERVERS:
                    check_grpc_answers(server, batched)
            scope = Scope(args.seconds, args.large_only, args.grpc_only)
            records += measure_servers(servers, batched, args.repeat, scope)
    finally:
        for server in servers:
            server.stop()
    if not (args.skip_workers or args.large_only or args.grpc_only):
        records += measure_workers(batched, work, args.repeat, args.seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "online.raw.json").write_text(json.dumps(records, indent=1))
    write_report(records, args.out, args.repeat, (time.time() - started) / 60)
    print(f"wrote {args.out / 'online.md'} and {args.out / 'online.png'}")


if __name__ == "__main__":
    main()
