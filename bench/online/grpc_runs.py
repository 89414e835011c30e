"""The gRPC scenarios: answers checked through grpcio, then load from h2load.

The same models, rows and concurrency as the REST scenarios in __main__; records of kinds
"grpc_single" and "grpc_bulk" with the fields of their REST counterparts.
"""

import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.online.h2load import run_h2load
from bench.online.messages import Contents, call, decode_response, infer_request
from bench.online.raw import load_runtime
from bench.online.servers import Server
from bench.online.workload import (
    ARTIFACTS,
    BULK_ROWS,
    CONCURRENCY,
    LARGE_ONLY_ARTIFACTS,
    WARM_UP_S,
    Artifact,
    build_request,
)
from bench.online.workload import features as make_features
from bench.online.wrk import Load, run_wrk
from service.store.runtimes import RuntimeOptions

GRPC_CONTENTS: tuple[Contents, ...] = ("contents", "raw")
Record = dict[str, Any]


def check_grpc_answers(server: Server, repository: Path) -> None:
    """One full decode per model, size and encoding through grpcio, as check_answers does over
    REST: labels equal and probabilities close to the raw call's."""
    for artifact in ARTIFACTS + LARGE_ONLY_ARTIFACTS:
        if not server.serves(artifact):
            continue
        runtime = load_runtime(repository, artifact, RuntimeOptions())
        for rows in (1, 1_000):
            data = make_features(artifact.model, rows)
            expected = runtime.predict({"input": data}).outputs
            n_classes = expected["probabilities"].shape[1]
            for contents in GRPC_CONTENTS:
                message = infer_request(server.kind, artifact, data, contents)
                response = call(f"127.0.0.1:{server.grpc_port}", message)
                answer = decode_response(server.kind, response, n_classes)
                if answer.labels != [str(v) for v in expected["label"]] or not np.allclose(
                    answer.probabilities, expected["probabilities"], atol=1e-4
                ):
                    raise RuntimeError(f"{server.name} answers {artifact.label} wrongly (gRPC)")


def grpc_single_rows(
    server: Server, artifact: Artifact, rep: int, seconds: float
) -> Iterator[Record]:
    """Single rows at each concurrency, as typed contents (the analogue of REST JSON)."""
    message = infer_request(server.kind, artifact, make_features(artifact.model, 1), "contents")
    run_h2load(server, message, max(CONCURRENCY), WARM_UP_S)  # warm-up, discarded
    for connections in CONCURRENCY:
        load = run_h2load(server, message, connections, seconds)
        yield load.single_row_record("grpc_single", rep, artifact.label, server.name, connections)


def grpc_large_requests(
    server: Server, artifact: Artifact, rep: int, seconds: float
) -> Iterator[Record]:
    """Large requests as typed contents and as raw_input_contents, one call at a time."""
    warm = False
    for rows in BULK_ROWS:
        data = make_features(artifact.model, rows)
        for contents in GRPC_CONTENTS:
            message = infer_request(server.kind, artifact, data, contents)
            if not warm:
                warm = bool(run_h2load(server, message, 1, WARM_UP_S))  # warm-up, discarded
            load = run_h2load(server, message, 1, seconds)
            yield {
                "kind": "grpc_bulk",
                "rep": rep,
                "artifact": artifact.label,
                "server": server.name,
                "rows": rows,
                "encoding": contents,
                "rows_per_s": load.rate * rows,
                "p50_ms": load.p50_ms,
                "cpu_us": load.cpu_us_per_request,
            }


# Seconds of each run of a pair, and how many of each side (in the order REST, gRPC, gRPC,
# REST, ...).
PAIR_RUN_S = 2.0
PAIR_RUNS = 4


def grpc_pair(server: Server, artifact: Artifact, label: str, rep: int, rows: int) -> Record:
    """gRPC against REST on the same server in mirrored runs, for the gRPC targets: single
    rows at c=64 (server CPU per call, typed contents against JSON) or `rows`-row requests one
    at a time (rows/s, raw contents against the binary extension).

    The two sides' table runs lie minutes apart, and over such gaps a shared machine drifts by
    tens of percent (one run's three repetitions gave gRPC/REST CPU ratios of 0.83, 1.09 and
    1.10); in short mirrored runs a drift falls on both sides alike.
    """
    data = make_features(artifact.model, rows)
    single = rows == 1
    rest = build_request(server.kind, artifact, data, label, "json" if single else "binary")
    grpc = infer_request(server.kind, artifact, data, "contents" if single else "raw")
    connections = 64 if single else 1

    def measure(load: Load) -> float:
        return load.cpu_us_per_request if single else load.rate * rows

    sides: dict[str, list[float]] = {"rest": [], "grpc": []}
    for side in ("rest", "grpc", "grpc", "rest") * (PAIR_RUNS // 2):
        if side == "rest":
            sides[side].append(measure(run_wrk(server, rest, connections, PAIR_RUN_S)))
        else:
            sides[side].append(measure(run_h2load(server, grpc, connections, PAIR_RUN_S)))
    rest_value, grpc_value = statistics.median(sides["rest"]), statistics.median(sides["grpc"])
    return {
        "kind": "grpc_pair",
        "rep": rep,
        "artifact": artifact.label,
        "rows": rows,
        "rest": rest_value,
        "grpc": grpc_value,
        "ratio": grpc_value / rest_value,
    }
