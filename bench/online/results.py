"""Measurements as tables: the median of each scenario over its runs, and look-ups by name."""

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
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


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def onnx_of(artifact: str) -> str:
    """Triton serves the ONNX version only: joblib rows compare with it through that."""
    return artifact.replace("v1 (joblib)", "v2 (onnx)")


def peer_of(artifact: str) -> str:
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
    grpc_single: Table
    grpc_bulk: Table
    grpc_pairs: Table
    share_pairs: Table

    @classmethod
    def of(cls, records: list[Record]) -> "Results":
        return cls(
            single=medians(records, "single", ("artifact", "server", "concurrency")),
            bulk=medians(records, "bulk", ("artifact", "server", "rows", "encoding")),
            raw=medians(records, "raw", ("artifact", "rows")),
            threads=medians(records, "onnx_threads", ("artifact", "rows", "threads")),
            workers=medians(records, "workers", ("workers",)),
            pairs=medians(records, "batching_pair", ("artifact",)),
            grpc_single=medians(records, "grpc_single", ("artifact", "server", "concurrency")),
            grpc_bulk=medians(records, "grpc_bulk", ("artifact", "server", "rows", "encoding")),
            grpc_pairs=medians(records, "grpc_pair", ("artifact", "rows")),
            share_pairs=medians(records, "share_pair", ("artifact",)),
        )

    def one(self, artifact: str, server: str, c: int, name: str = "rate") -> float | None:
        record = self.single.get((artifact, server, c))
        return None if record is None else float(record[name])

    def pairratio(self, artifact: str) -> float | None:
        """c=1 p50 batching on / off from the paired runs, else from the single-row table."""
        record = self.pairs.get((artifact,))
        if record is not None:
            return float(record["ratio"])
        return ratio(
            self.one(artifact, OURS, 1, "p50_ms"), self.one(artifact, OURS_UNBATCHED, 1, "p50_ms")
        )

    def rows(self, artifact: str, server: str, n: int, encoding: str) -> float | None:
        record = self.bulk.get((artifact, server, n, encoding))
        return None if record is None else float(record["rows_per_s"])

    def grpc_one(self, artifact: str, server: str, c: int, name: str = "rate") -> float | None:
        record = self.grpc_single.get((artifact, server, c))
        return None if record is None else float(record[name])

    def grpc_pair(self, artifact: str, rows: int) -> float | None:
        """gRPC / REST from the paired runs (see grpc_runs.grpc_pair), when there are some."""
        record = self.grpc_pairs.get((artifact, rows))
        return None if record is None else float(record["ratio"])

    def share_pair(self, artifact: str) -> float | None:
        """10,000-row binary rows/s / the raw call's, from the paired runs, when there are some."""
        record = self.share_pairs.get((artifact,))
        return None if record is None else float(record["ratio"])

    def grpc_rows(self, artifact: str, server: str, n: int, contents: str) -> float | None:
        record = self.grpc_bulk.get((artifact, server, n, contents))
        return None if record is None else float(record["rows_per_s"])

    def raw_rows(self, artifact: str, n: int, call: str = "runtime") -> float | None:
        record = self.raw.get((artifact, n))
        return None if record is None or call not in record else float(record[call])
