"""Turns measurements into bench/results/online.md (targets and tables) and online.png."""

import statistics
from pathlib import Path

from bench.online.grpc_report import grpc_tables
from bench.online.results import (
    FOREST,
    FOREST_ONNX,
    IRIS,
    IRIS_INT,
    IRIS_INT_ONNX,
    IRIS_ONNX,
    MLSERVER,
    MLSERVER_AB,
    OURS,
    OURS_UNBATCHED,
    TIMES,
    TRITON,
    TUTORIAL,
    Record,
    Results,
    Table,
    fmt,
    onnx_of,
    peer_of,
    ratio,
)

Goal = tuple[str, float | None, str, float]


def _goals(r: Results) -> list[Goal]:
    """(name, measured, sense, goal) of each target, from one set of measurements."""
    p50 = "p50_ms"
    goals: list[Goal] = [
        (
            f"iris joblib, 1 row, c=64: {TIMES} MLServer",
            ratio(r.one(IRIS, OURS, 64), r.one(IRIS, MLSERVER, 64)),
            ">=",
            5.0,
        ),
        (
            f"iris joblib, 1 row, c=64: {TIMES} tutorial FastAPI",
            ratio(r.one(IRIS, OURS, 64), r.one(IRIS, TUTORIAL, 64)),
            ">=",
            2.5,
        ),
        (
            "iris ONNX, 1 row, c=64: server CPU µs/request",
            r.one(IRIS_ONNX, OURS, 64, "cpu_us"),
            "<=",
            100,
        ),
        (
            "iris joblib, 1 row, c=1: p50 / MLServer p50",
            ratio(r.one(IRIS, OURS, 1, p50), r.one(IRIS, MLSERVER, 1, p50)),
            "<=",
            0.5,
        ),
        (
            "iris ONNX, 1 row, c=1: p50 / MLServer (joblib) p50",
            ratio(r.one(IRIS_ONNX, OURS, 1, p50), r.one(IRIS, MLSERVER, 1, p50)),
            "<=",
            0.5,
        ),
        (
            "iris joblib, 1 row, c=1: p50 batching on / off (paired runs)",
            r.pairratio(IRIS),
            "<=",
            1.1,
        ),
        (
            "iris ONNX, 1 row, c=1: p50 batching on / off (paired runs)",
            r.pairratio(IRIS_ONNX),
            "<=",
            1.1,
        ),
        (
            f"iris ONNX, 1 row, c=64: {TIMES} Triton",
            ratio(r.one(IRIS_ONNX, OURS, 64), r.one(IRIS_ONNX, TRITON, 64)),
            ">=",
            3.0,
        ),
        (
            f"forest joblib, 1 row, c=64: {TIMES} MLServer with adaptive batching",
            ratio(r.one(FOREST, OURS, 64), r.one(FOREST, MLSERVER_AB, 64)),
            ">=",
            4.0,
        ),
        (
            f"forest ONNX (converted), 1 row, c=64: {TIMES} MLServer with adaptive batching",
            ratio(r.one(FOREST_ONNX, OURS, 64), r.one(FOREST, MLSERVER_AB, 64)),
            ">=",
            5.0,
        ),
        (
            f"forest ONNX (converted), 1 row, c=64: {TIMES} iris ONNX",
            ratio(r.one(FOREST_ONNX, OURS, 64), r.one(IRIS_ONNX, OURS, 64)),
            ">=",
            0.9,
        ),
    ]
    # The 10,000-row goals are set for iris; the forest's numbers are in the tables below.
    for artifact, name in ((IRIS, "iris"),):
        goals.append(
            (
                f"{name} joblib, 10,000 rows, JSON: {TIMES} MLServer",
                ratio(
                    r.rows(artifact, OURS, 10_000, "json"),
                    r.rows(artifact, MLSERVER, 10_000, "json"),
                ),
                ">=",
                3.0,
            )
        )
    # Against the bare call a hand-written server makes: the estimator's predict and
    # predict_proba, or the session's run. runtime.predict is our own code, several times
    # faster than the estimator's own methods for linear models and forests, so a share of it
    # would measure only the server around it, and fall as the runtime gets faster. Integer
    # labels: answers without strings, so the floor is the model call itself.
    for label, artifact, call, goal in (
        ("iris joblib", IRIS, "estimator", 0.6),
        ("iris ONNX", IRIS_ONNX, "session", 0.6),
        ("iris_int joblib", IRIS_INT, "estimator", 0.8),
        ("iris_int ONNX", IRIS_INT_ONNX, "session", 0.5),
    ):
        what = "predict + predict_proba" if call == "estimator" else "session.run"
        paired = r.share_pair(artifact)
        goals.append(
            (
                f"{label}, 10,000 rows, binary: share of the raw {what} rows/s"
                + (" (paired runs)" if paired is not None else ""),
                paired
                if paired is not None
                else ratio(
                    r.rows(artifact, OURS, 10_000, "binary"), r.raw_rows(artifact, 10_000, call)
                ),
                ">=",
                goal,
            )
        )
    # gRPC against REST: from the paired runs when the run made them, else from the tables.
    paired = r.grpc_pair(IRIS_ONNX, 1)
    goals.append(
        (
            "iris ONNX, 1 row, c=64: gRPC server CPU µs/request / REST JSON's"
            + (" (paired runs)" if paired is not None else ""),
            paired
            if paired is not None
            else ratio(
                r.grpc_one(IRIS_ONNX, OURS, 64, "cpu_us"), r.one(IRIS_ONNX, OURS, 64, "cpu_us")
            ),
            "<=",
            1.0,
        )
    )
    for artifact, name in ((IRIS, "iris joblib"), (IRIS_ONNX, "iris ONNX")):
        paired = r.grpc_pair(artifact, 10_000)
        goals.append(
            (
                f"{name}, 10,000 rows: gRPC raw contents rows/s / REST binary's"
                + (" (paired runs)" if paired is not None else ""),
                paired
                if paired is not None
                else ratio(
                    r.grpc_rows(artifact, OURS, 10_000, "raw"),
                    r.rows(artifact, OURS, 10_000, "binary"),
                ),
                ">=",
                1.0,
            )
        )
    return goals


def _targets(repetitions: list[Results]) -> list[str]:
    """Each target's median over the repetitions, a ratio taken within each repetition.

    Ratios pair numbers measured minutes apart at most; a repetition during which the
    whole machine ran slow moves both sides of its ratios rather than one.
    """
    lines = ["| target | measured | goal | met |", "|---|---:|---:|:---:|"]
    for goals in zip(*(_goals(r) for r in repetitions), strict=True):
        name, _, sense, goal = goals[0]
        measured = [g[1] for g in goals if g[1] is not None]
        value = statistics.median(measured) if measured else None
        if value is None:
            met = "not measured"
        else:
            met = "yes" if (value >= goal if sense == ">=" else value <= goal) else "**no**"
        lines.append(f"| {name} | {fmt(value, 2)} | {sense} {goal:g} | {met} |")
    return lines


def _single_table(r: Results) -> list[str]:
    lines = [
        "| model | server | c | req/s | p50 ms | p99 ms | server CPU µs/req "
        f"| {TIMES} MLServer | {TIMES} Triton |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (artifact, server, c), record in sorted(
        r.single.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])
    ):
        mlserver = ratio(record["rate"], r.one(peer_of(artifact), MLSERVER, c))
        triton = ratio(record["rate"], r.one(onnx_of(artifact), TRITON, c))
        lines.append(
            f"| {artifact} | {server} | {c} | {fmt(record['rate'])} "
            f"| {fmt(record['p50_ms'], 2)} | {fmt(record['p99_ms'], 2)} "
            f"| {fmt(record['cpu_us'])} | {fmt(mlserver, 2)} | {fmt(triton, 2)} |"
        )
    return lines


def _bulk_table(r: Results) -> list[str]:
    lines = [
        f"| model | rows/request | server | body | rows/s | p50 ms | % of raw call "
        f"| {TIMES} MLServer | {TIMES} Triton (same body) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for (artifact, server, n, encoding), record in sorted(r.bulk.items()):
        share = ratio(record["rows_per_s"], r.raw_rows(artifact, n))
        peer = r.rows(peer_of(artifact), MLSERVER, n, "json")
        triton = r.rows(onnx_of(artifact), TRITON, n, encoding)
        lines.append(
            f"| {artifact} | {n:,} | {server} | {encoding} | {fmt(record['rows_per_s'])} "
            f"| {fmt(record['p50_ms'], 1)} | {fmt(None if share is None else share * 100)} % "
            f"| {fmt(ratio(record['rows_per_s'], peer), 2)} "
            f"| {fmt(ratio(record['rows_per_s'], triton), 2)} |"
        )
    return lines


def _raw_table(r: Results) -> list[str]:
    lines = [
        "| model | rows/call | runtime.predict rows/s | µs/call "
        "| predict + predict_proba or session.run rows/s "
        "| ONNX 1 intra-op thread rows/s | ONNX 2 threads rows/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (artifact, n), record in sorted(r.raw.items()):
        one, two = r.threads.get((artifact, n, 1)), r.threads.get((artifact, n, 2))
        lines.append(
            f"| {artifact} | {n:,} | {fmt(record['runtime'])} "
            f"| {fmt(n / record['runtime'] * 1e6, 1)} "
            f"| {fmt(record.get('estimator', record.get('session')))} "
            f"| {fmt(None if one is None else one['rows_per_s'])} "
            f"| {fmt(None if two is None else two['rows_per_s'])} |"
        )
    return lines


def _workers_table(r: Results) -> list[str]:
    if not r.workers:
        return []
    rows = {key[0]: record for key, record in r.workers.items()}
    rates = {workers: float(record["rate"]) for workers, record in rows.items()}
    return [
        "## Workers (iris ONNX, 1 row, c=64; server and wrk share both cores)",
        "",
        "| workers | req/s | server cores busy |",
        "|---:|---:|---:|",
        *(
            f"| {workers} | {fmt(rates[workers])} | {fmt(record.get('cores'), 2)} |"
            for workers, record in sorted(rows.items())
        ),
        "",
        f"Two workers serve {fmt(ratio(rates.get(2), rates.get(1)), 2)}{TIMES} the requests "
        "of one; wrk needs a share of the same two cores.",
        "",
    ]


def _plot(single: Table, grpc: Table, path: Path) -> None:
    """p99 against requests/s per model; gRPC dashed, in its server's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [OURS, OURS_UNBATCHED, MLSERVER, MLSERVER_AB, TUTORIAL, TRITON]
    colours = dict(zip(servers, ("C2", "C1", "C0", "C9", "C4", "C3"), strict=True))
    artifacts = sorted({key[0] for key in single} | {key[0] for key in grpc})
    figure, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    lines = [(server, table) for table in (single, grpc) for server in servers]
    for axis, artifact in zip(axes.flat, artifacts, strict=False):
        for server, table in lines:
            points = sorted(
                (key[2], rec) for key, rec in table.items() if key[:2] == (artifact, server)
            )
            if not points:
                continue
            rates = [rec["rate"] for _, rec in points]
            p99 = [rec["p99_ms"] for _, rec in points]
            over_grpc = table is grpc
            axis.plot(
                rates,
                p99,
                marker="o",
                label=f"{server} gRPC" if over_grpc else server,
                color=colours[server],
                linestyle="--" if over_grpc else "-",
            )
            for c, rec in points:
                axis.annotate(f"c={c}", (rec["rate"], rec["p99_ms"]), fontsize=7)
        axis.set_title(f"{artifact}, 1-row requests")
        axis.set_xlabel("requests/s (server on one core)")
        axis.set_ylabel("p99 latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(records: list[Record], out: Path, repeat: int, minutes: float) -> None:
    results = Results.of(records)
    lines = [
        "# Online benchmark",
        "",
        f"Written by `bench/run.sh`: medians of {repeat} interleaved repetitions "
        f"({minutes:.0f} min). Each server is pinned to core 0 and wrk (h2load for gRPC) to "
        "core 1; every response is checked for its status and its label. Server CPU is the "
        "user + system time of the server's processes per request (for Triton: the PyTriton "
        "process, tritonserver and its Python-backend stubs). MLServer and the tutorial server "
        "serve the joblib versions only, so ONNX rows compare with their joblib numbers; "
        "Triton (through PyTriton, an onnxruntime session in the bound function, dynamic "
        "batching) serves the ONNX versions only, so joblib rows compare with its ONNX "
        "numbers. Targets are medians over the repetitions of values (and ratios) taken within "
        "each one. The batching on / off targets come from paired c=1 runs: six 1 s runs each, "
        "in the order on, off, off, on, ..., medians. The gRPC / REST targets likewise come "
        "from paired runs on the same server (four 2 s runs each, REST, gRPC, gRPC, REST, ...; "
        "medians): the tables' gRPC and REST runs lie minutes apart. The shares of the raw "
        "call come from paired runs too: the raw call on core 0 and the server, 1 s each, "
        "raw, served, served, raw, ... (six of each; medians).",
        "",
        "## Targets",
        "",
        *_targets([Results.of([r for r in records if r["rep"] == rep]) for rep in range(repeat)]),
        "",
        "## Single-row requests",
        "",
        *_single_table(results),
        "",
        "## Large requests (one connection)",
        "",
        *_bulk_table(results),
        "",
        *grpc_tables(results),
        "## Raw in-process calls (core 0; the ONNX thread columns run on both cores)",
        "",
        *_raw_table(results),
        "",
        *_workers_table(results),
        "![throughput against p99 latency](online.png)",
        "",
    ]
    (out / "online.md").write_text("\n".join(lines))
    _plot(results.single, results.grpc_single, out / "online.png")
