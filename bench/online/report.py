"""Turns measurements into bench/results/online.md (targets and tables) and online.png."""

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]
Table = dict[tuple[Any, ...], Record]
OURS, OURS_UNBATCHED = "modelserve", "modelserve (no batching)"
MLSERVER, MLSERVER_AB = "MLServer", "MLServer (adaptive batching)"
TUTORIAL, TRITON = "tutorial FastAPI", "Triton"
IRIS, IRIS_ONNX = "iris v1 (joblib)", "iris v2 (onnx)"
FOREST, FOREST_ONNX = "breast_cancer v1 (joblib)", "breast_cancer v2 (onnx)"
IRIS_INT, IRIS_INT_ONNX = "iris_int v1 (joblib)", "iris_int v2 (onnx)"
TIMES = "\N{MULTIPLICATION SIGN}"


def medians(records: Iterable[Record], kind: str, keys: tuple[str, ...]) -> Table:
    """Records of one kind grouped by `keys`, each measured field replaced by its median."""
    groups: dict[tuple[Any, ...], list[Record]] = defaultdict(list)
    for record in records:
        if record["kind"] == kind:
            groups[tuple(record[k] for k in keys)].append(record)
    table: Table = {}
    for key, group in groups.items():
        merged = dict(group[0])
        for name, value in group[0].items():
            if isinstance(value, float):
                merged[name] = statistics.median(r[name] for r in group)
        table[key] = merged
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _onnx_of(artifact: str) -> str:
    """Triton serves the ONNX version only: joblib rows compare with it through that."""
    return artifact.replace("v1 (joblib)", "v2 (onnx)")


def _peer_of(artifact: str) -> str:
    """MLServer serves the joblib version only: ONNX rows compare with it too."""
    return artifact.replace("v2 (onnx)", "v1 (joblib)")


@dataclass(frozen=True)
class Results:
    single: Table
    bulk: Table
    raw: Table
    threads: Table
    workers: Table
    pairs: Table

    @classmethod
    def of(cls, records: list[Record]) -> "Results":
        return cls(
            single=medians(records, "single", ("artifact", "server", "concurrency")),
            bulk=medians(records, "bulk", ("artifact", "server", "rows", "encoding")),
            raw=medians(records, "raw", ("artifact", "rows")),
            threads=medians(records, "onnx_threads", ("artifact", "rows", "threads")),
            workers=medians(records, "workers", ("workers",)),
            pairs=medians(records, "batching_pair", ("artifact",)),
        )

    def one(self, artifact: str, server: str, c: int, name: str = "rate") -> float | None:
        record = self.single.get((artifact, server, c))
        return None if record is None else float(record[name])

    def pair_ratio(self, artifact: str) -> float | None:
        """c=1 p50 batching on / off from the paired runs, else from the single-row table."""
        record = self.pairs.get((artifact,))
        if record is not None:
            return float(record["ratio"])
        return _ratio(
            self.one(artifact, OURS, 1, "p50_ms"), self.one(artifact, OURS_UNBATCHED, 1, "p50_ms")
        )

    def rows(self, artifact: str, server: str, n: int, encoding: str) -> float | None:
        record = self.bulk.get((artifact, server, n, encoding))
        return None if record is None else float(record["rows_per_s"])

    def raw_rows(self, artifact: str, n: int, call: str = "runtime") -> float | None:
        record = self.raw.get((artifact, n))
        return None if record is None or call not in record else float(record[call])


Goal = tuple[str, float | None, str, float]


def _goals(r: Results) -> list[Goal]:
    """(name, measured, sense, goal) of each target, from one set of measurements."""
    p50 = "p50_ms"
    goals: list[Goal] = [
        (
            f"iris joblib, 1 row, c=64: {TIMES} MLServer",
            _ratio(r.one(IRIS, OURS, 64), r.one(IRIS, MLSERVER, 64)),
            ">=",
            5.0,
        ),
        (
            f"iris joblib, 1 row, c=64: {TIMES} tutorial FastAPI",
            _ratio(r.one(IRIS, OURS, 64), r.one(IRIS, TUTORIAL, 64)),
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
            _ratio(r.one(IRIS, OURS, 1, p50), r.one(IRIS, MLSERVER, 1, p50)),
            "<=",
            0.5,
        ),
        (
            "iris ONNX, 1 row, c=1: p50 / MLServer (joblib) p50",
            _ratio(r.one(IRIS_ONNX, OURS, 1, p50), r.one(IRIS, MLSERVER, 1, p50)),
            "<=",
            0.5,
        ),
        (
            "iris joblib, 1 row, c=1: p50 batching on / off (paired runs)",
            r.pair_ratio(IRIS),
            "<=",
            1.1,
        ),
        (
            "iris ONNX, 1 row, c=1: p50 batching on / off (paired runs)",
            r.pair_ratio(IRIS_ONNX),
            "<=",
            1.1,
        ),
        (
            f"iris ONNX, 1 row, c=64: {TIMES} Triton",
            _ratio(r.one(IRIS_ONNX, OURS, 64), r.one(IRIS_ONNX, TRITON, 64)),
            ">=",
            3.0,
        ),
        (
            f"forest joblib, 1 row, c=64: {TIMES} MLServer with adaptive batching",
            _ratio(r.one(FOREST, OURS, 64), r.one(FOREST, MLSERVER_AB, 64)),
            ">=",
            4.0,
        ),
        (
            f"forest ONNX (converted), 1 row, c=64: {TIMES} MLServer with adaptive batching",
            _ratio(r.one(FOREST_ONNX, OURS, 64), r.one(FOREST, MLSERVER_AB, 64)),
            ">=",
            5.0,
        ),
        (
            f"forest ONNX (converted), 1 row, c=64: {TIMES} iris ONNX",
            _ratio(r.one(FOREST_ONNX, OURS, 64), r.one(IRIS_ONNX, OURS, 64)),
            ">=",
            0.9,
        ),
    ]
    # The 10,000-row goals are set for iris; the forest's numbers are in the tables below.
    for artifact, name in ((IRIS, "iris"),):
        goals.append(
            (
                f"{name} joblib, 10,000 rows, JSON: {TIMES} MLServer",
                _ratio(
                    r.rows(artifact, OURS, 10_000, "json"),
                    r.rows(artifact, MLSERVER, 10_000, "json"),
                ),
                ">=",
                3.0,
            )
        )
        for call, what in (
            ("estimator", "predict + predict_proba"),
            ("runtime", "runtime.predict"),
        ):
            goals.append(
                (
                    f"{name} joblib, 10,000 rows, binary: share of the raw {what} rows/s",
                    _ratio(
                        r.rows(artifact, OURS, 10_000, "binary"), r.raw_rows(artifact, 10_000, call)
                    ),
                    ">=",
                    0.6,
                )
            )
    # The bare session.run, as a hand-written server calls it: runtime.predict is our own code.
    for artifact, name in ((IRIS_ONNX, "iris"),):
        goals.append(
            (
                f"{name} ONNX, 10,000 rows, binary: share of the raw session.run rows/s",
                _ratio(
                    r.rows(artifact, OURS, 10_000, "binary"),
                    r.raw_rows(artifact, 10_000, "session"),
                ),
                ">=",
                0.6,
            )
        )
    # Integer labels: answers without strings, so the floor is the model call itself.
    goals += [
        (
            "iris_int joblib, 10,000 rows, binary: share of the raw predict + predict_proba rows/s",
            _ratio(
                r.rows(IRIS_INT, OURS, 10_000, "binary"), r.raw_rows(IRIS_INT, 10_000, "estimator")
            ),
            ">=",
            0.8,
        ),
        (
            "iris_int ONNX, 10,000 rows, binary: share of the raw session.run rows/s",
            _ratio(
                r.rows(IRIS_INT_ONNX, OURS, 10_000, "binary"),
                r.raw_rows(IRIS_INT_ONNX, 10_000, "session"),
            ),
            ">=",
            0.5,
        ),
    ]
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
        lines.append(f"| {name} | {_fmt(value, 2)} | {sense} {goal:g} | {met} |")
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
        ratio = _ratio(record["rate"], r.one(_peer_of(artifact), MLSERVER, c))
        triton = _ratio(record["rate"], r.one(_onnx_of(artifact), TRITON, c))
        lines.append(
            f"| {artifact} | {server} | {c} | {_fmt(record['rate'])} "
            f"| {_fmt(record['p50_ms'], 2)} | {_fmt(record['p99_ms'], 2)} "
            f"| {_fmt(record['cpu_us'])} | {_fmt(ratio, 2)} | {_fmt(triton, 2)} |"
        )
    return lines


def _bulk_table(r: Results) -> list[str]:
    lines = [
        f"| model | rows/request | server | body | rows/s | p50 ms | % of raw call "
        f"| {TIMES} MLServer | {TIMES} Triton (same body) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for (artifact, server, n, encoding), record in sorted(r.bulk.items()):
        share = _ratio(record["rows_per_s"], r.raw_rows(artifact, n))
        peer = r.rows(_peer_of(artifact), MLSERVER, n, "json")
        triton = r.rows(_onnx_of(artifact), TRITON, n, encoding)
        lines.append(
            f"| {artifact} | {n:,} | {server} | {encoding} | {_fmt(record['rows_per_s'])} "
            f"| {_fmt(record['p50_ms'], 1)} | {_fmt(None if share is None else share * 100)} % "
            f"| {_fmt(_ratio(record['rows_per_s'], peer), 2)} "
            f"| {_fmt(_ratio(record['rows_per_s'], triton), 2)} |"
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
            f"| {artifact} | {n:,} | {_fmt(record['runtime'])} "
            f"| {_fmt(n / record['runtime'] * 1e6, 1)} "
            f"| {_fmt(record.get('estimator', record.get('session')))} "
            f"| {_fmt(None if one is None else one['rows_per_s'])} "
            f"| {_fmt(None if two is None else two['rows_per_s'])} |"
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
            f"| {workers} | {_fmt(rates[workers])} | {_fmt(record.get('cores'), 2)} |"
            for workers, record in sorted(rows.items())
        ),
        "",
        f"Two workers serve {_fmt(_ratio(rates.get(2), rates.get(1)), 2)}{TIMES} the requests "
        "of one; wrk needs a share of the same two cores.",
        "",
    ]


def _plot(single: Table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [OURS, OURS_UNBATCHED, MLSERVER, MLSERVER_AB, TUTORIAL, TRITON]
    colours = dict(zip(servers, ("C2", "C1", "C0", "C9", "C4", "C3"), strict=True))
    artifacts = sorted({key[0] for key in single})
    figure, axes = plt.subplots(2, 2, figsize=(12, 9), squeeze=False)
    for axis, artifact in zip(axes.flat, artifacts, strict=False):
        for server in servers:
            points = sorted(
                (key[2], rec) for key, rec in single.items() if key[:2] == (artifact, server)
            )
            if not points:
                continue
            rates = [rec["rate"] for _, rec in points]
            p99 = [rec["p99_ms"] for _, rec in points]
            axis.plot(rates, p99, marker="o", label=server, color=colours[server])
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
        f"({minutes:.0f} min). Each server is pinned to core 0 and wrk to core 1; every "
        "response is checked for its status and its label. Server CPU is the user + system "
        "time of the server's processes per request (for Triton: the PyTriton process, "
        "tritonserver and its Python-backend stubs). MLServer and the tutorial server serve "
        "the joblib versions only, so ONNX rows compare with their joblib numbers; Triton "
        "(through PyTriton, an onnxruntime session in the bound function, dynamic batching) "
        "serves the ONNX versions only, so joblib rows compare with its ONNX numbers. Targets "
        "are medians over the repetitions of values (and ratios) taken within each one. The "
        "batching on / off targets come from paired c=1 runs: six 1 s runs each, in the order "
        "on, off, off, on, ..., medians.",
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
        "## Raw in-process calls (core 0; the ONNX thread columns run on both cores)",
        "",
        *_raw_table(results),
        "",
        *_workers_table(results),
        "![throughput against p99 latency](online.png)",
        "",
    ]
    (out / "online.md").write_text("\n".join(lines))
    _plot(results.single, out / "online.png")
