"""Soak test: a real server under mixed good and bad traffic for a bounded time.

Several concurrent clients send a fixed mix of requests (good V2 and V1 inference, malformed
JSON, wrong shapes, unknown models, wrong content types, oversized bodies) to a `modelserve
serve` process on 127.0.0.1. It passes when every answer has the status its request calls for
and the server's resident memory grows less than 10% between the end of the warm-up and the end.

    .venv/bin/python -m bench.soak [--duration 60] [--clients 8] [--warmup 10]

Prints one JSON summary and exits non-zero on failure. Not part of the test command.
"""

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from tests.serving import run_server
from training.examples import train_examples

MAX_BYTES = 200_000
ROW = [5.1, 3.5, 1.4, 0.2]


@dataclass(frozen=True)
class Kind:
    name: str
    path: str
    body: bytes
    content_type: str
    expected: int


def _v2(rows: Any, shape: list[int], datatype: str = "FP32") -> bytes:
    tensor = {"name": "input", "shape": shape, "datatype": datatype, "data": rows}
    return orjson.dumps({"inputs": [tensor]})


def traffic() -> list[Kind]:
    """The request mix, good kinds weighted up by repetition."""
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 8, size=(32, 4)).round(2).tolist()
    json = "application/json"
    good = [
        Kind("v2-one-row", "/v2/models/iris/infer", _v2([ROW], [1, 4]), json, 200),
        Kind("v2-batch-32", "/v2/models/iris/versions/1/infer", _v2(batch, [32, 4]), json, 200),
        Kind("v1", "/v1/models/iris:predict", orjson.dumps({"instances": [ROW]}), json, 200),
        Kind(
            "regression",
            "/v2/models/diabetes/infer",
            _v2([[0.01] * 10], [1, 10]),
            json,
            200,
        ),
    ]
    bad = [
        Kind("malformed-json", "/v2/models/iris/infer", b'{"inputs": [', json, 400),
        Kind("wrong-width", "/v2/models/iris/infer", _v2([[1.0, 2.0]], [1, 2]), json, 400),
        Kind("strings", "/v2/models/iris/infer", _v2([["a", "b", "c", "d"]], [1, 4]), json, 400),
        Kind("unknown-model", "/v2/models/nope/infer", _v2([ROW], [1, 4]), json, 404),
        Kind("text-plain", "/v2/models/iris/infer", _v2([ROW], [1, 4]), "text/plain", 415),
        Kind("too-large", "/v2/models/iris/infer", b" " * (MAX_BYTES + 1), json, 413),
        Kind("deep", "/v2/models/iris/infer", b"[" * 5000 + b"]" * 5000, json, 400),
    ]
    return good * 3 + bad


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def client(
    url: str, kinds: list[Kind], stop_at: float, seed: int, results: Counter[tuple[str, int]]
) -> list[float]:
    rng = np.random.default_rng(seed)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        while time.monotonic() < stop_at:
            kind = kinds[int(rng.integers(len(kinds)))]
            started = time.perf_counter()
            response = await http.post(
                kind.path, content=kind.body, headers={"Content-Type": kind.content_type}
            )
            if kind.expected == 200:
                latencies.append(time.perf_counter() - started)
            results[(kind.name, response.status_code)] += 1
    return latencies


async def sample_rss(pid: int, stop_at: float, samples: list[tuple[float, int]]) -> None:
    started = time.monotonic()
    while time.monotonic() < stop_at:
        samples.append((time.monotonic() - started, rss_bytes(pid)))
        await asyncio.sleep(1.0)
    samples.append((time.monotonic() - started, rss_bytes(pid)))


async def soak(url: str, pid: int, duration: float, clients: int) -> dict[str, Any]:
    kinds = traffic()
    expected = {k.name: k.expected for k in kinds}
    results: Counter[tuple[str, int]] = Counter()
    samples: list[tuple[float, int]] = []
    stop_at = time.monotonic() + duration
    sampler = asyncio.create_task(sample_rss(pid, stop_at, samples))
    per_client = await asyncio.gather(
        *(client(url, kinds, stop_at, seed, results) for seed in range(clients))
    )
    await sampler
    latencies = np.array([x for xs in per_client for x in xs])
    unexpected = {
        f"{name} -> {status}": count
        for (name, status), count in results.items()
        if expected[name] != status
    }
    return {
        "requests": sum(results.values()),
        "by_kind": {f"{n} -> {s}": c for (n, s), c in sorted(results.items())},
        "unexpected": unexpected,
        "good_latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p99": round(float(np.percentile(latencies, 99)) * 1000, 2),
        },
        "rss_samples": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load in all")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before RSS counts")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        train_examples(root)
        env = {"MODELSERVE_MAX_REQUEST_BYTES": str(MAX_BYTES)}
        with run_server(root, Path(tmp), env=env) as server:
            report = asyncio.run(soak(server.url, server.process.pid, args.duration, args.clients))
    samples = report.pop("rss_samples")
    warm = next(rss for t, rss in samples if t >= args.warmup)
    final = samples[-1][1]
    growth = (final - warm) / warm * 100
    report["seconds"] = args.duration
    report["clients"] = args.clients
    report["requests_per_second"] = round(report["requests"] / args.duration, 1)
    report["rss_mib"] = {
        "start": round(samples[0][1] / 2**20, 1),
        "after_warmup": round(warm / 2**20, 1),
        "end": round(final / 2**20, 1),
        "max": round(max(rss for _, rss in samples) / 2**20, 1),
        "growth_after_warmup_percent": round(growth, 2),
    }
    report["passed"] = not report["unexpected"] and growth < 10.0
    sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
