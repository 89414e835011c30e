"""Runs wrk on its own core with a Lua script that checks every response."""

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.online.servers import Server
from bench.online.workload import Request

SCRIPT = Path(__file__).with_name("check.lua")


@dataclass(frozen=True)
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def single_row_record(
        self, kind: str, rep: int, artifact: str, server: str, concurrency: int
    ) -> dict[str, Any]:
        """A single-row run as the report reads it (REST and gRPC alike)."""
        return {
            "kind": kind,
            "rep": rep,
            "artifact": artifact,
            "server": server,
            "concurrency": concurrency,
            "rate": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "cpu_us": self.cpu_us_per_request,
        }


def run_wrk(
    server: Server, request: Request, connections: int, seconds: float, cores: str = "1"
) -> Load:
    """Load `server` with one request body; fails on any wrong answer or socket error."""
    with tempfile.NamedTemporaryFile(suffix=".body") as body:
        body.write(request.body)
        body.flush()
        header = "-" if request.header_length is None else str(request.header_length)
        command = ["taskset", "-c", cores, "wrk", "-t1", f"-c{connections}"]
        command += [f"-d{seconds:g}s", "--timeout", "30s", "-s", str(SCRIPT), server.url]
        command += ["--", request.path, body.name, request.content_type, header]
        command += list(request.markers)
        cpu_before = server.cpu_seconds()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
        cpu = server.cpu_seconds() - cpu_before
    report = json.loads(done.stdout.strip().splitlines()[-1])
    problems = report["bad"] + report["socket_errors"] + report["non_2xx"]
    if problems or report["requests"] == 0:
        raise RuntimeError(f"{server.name} {request.path}: wrong answers or errors: {report}")
    return Load(
        requests=report["requests"],
        seconds=report["duration_us"] / 1e6,
        p50_ms=report["p50_us"] / 1000,
        p99_ms=report["p99_us"] / 1000,
        cpu_us_per_request=cpu * 1e6 / report["requests"],
    )
