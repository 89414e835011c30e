"""The gRPC scenarios: answers checked through grpcio, then load from h2load.

The same models, rows and concurrency as the REST scenarios in __main__; records of kinds
"grpc_single" and "grpc_bulk" with the fields of their REST counterparts.
"""

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
)
from bench.online.workload import features as make_features
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
