"""Runs h2load on its own core with gRPC ModelInfer calls, and checks the server answered them.

h2load is compiled (nghttp2), as wrk is, so one core of it keeps a server on the other busy.
It posts one framed message over HTTP/2. A gRPC error still answers HTTP 200 (the code is in
the grpc-status trailer, which h2load does not read), so the server's own count of calls by
outcome, from its /metrics before and after the run, must show every call answered OK.
"""

import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from bench.online.messages import INFER_PATH, frame
from bench.online.servers import Server
from bench.online.wrk import Load
from service.protocols.grpc import open_inference_grpc_pb2 as pb

# Calls still in flight when h2load stops are cancelled by the client, not failed.
CANCELLED = "cancelled"
OK = "ok"


def grpc_outcomes(server: Server) -> Counter[str]:
    """ModelInfer calls the server counted so far: "ok", "cancelled", or their error code."""
    text = httpx.get(server.metrics_url, timeout=10.0).text
    outcomes: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if server.kind == "modelserve" and sample.name == "modelserve_requests_total":
                if labels.get("protocol") == "grpc":
                    code = labels["code"]
                    outcome = {"200": OK, "499": CANCELLED}.get(code, code)
                    outcomes[outcome] += int(sample.value)
            elif (
                sample.name == "grpc_server_handled_total"  # py-grpc-prometheus (MLServer)
                and labels.get("grpc_method") == "ModelInfer"
            ):
                code = labels["grpc_code"]
                outcome = {"OK": OK, "CANCELLED": CANCELLED}.get(code, code)
                outcomes[outcome] += int(sample.value)
    return outcomes


def h2load_command(url: str, body: Path, log: Path, concurrency: int, seconds: float) -> list[str]:
    """One connection per outstanding call, as wrk keeps one request on each of its
    connections: the server sees the same `concurrency` connections and calls either way."""
    command = ["h2load", "-t1", f"-c{concurrency}", "-m1", f"-D{round(seconds * 1000)}ms"]
    command += ["-d", str(body), "--log-file", str(log)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    return [*command, url + INFER_PATH]


def _seconds(duration: str) -> float:
    """h2load's durations: "4.00s", "500.12ms", "800us"."""
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if duration.endswith(unit):
            return float(duration.removesuffix(unit)) * scale
    raise ValueError(f"not a duration: {duration!r}")


def parse_summary(output: str) -> tuple[int, float]:
    """Succeeded requests and seconds measured, from h2load's summary."""
    succeeded, seconds = None, None
    for line in output.splitlines():
        if line.startswith("finished in "):
            # finished in 4.00s, 5123.50 req/s, 1.20MB/s
            seconds = _seconds(line.split()[2].rstrip(","))
        elif line.startswith("requests:"):
            # requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, 0 errored, ...
            counts = {part.split()[1]: int(part.split()[0]) for part in line[9:].split(",")}
            succeeded = counts["succeeded"]
    if succeeded is None or seconds is None:
        raise RuntimeError(f"h2load printed no summary: {output}")
    return succeeded, seconds


def run_h2load(
    server: Server,
    message: pb.ModelInferRequest,
    concurrency: int,
    seconds: float,
    cores: str = "1",
) -> Load:
    """Load `server`'s gRPC port with one message; fails unless every call was answered OK."""
    url = f"http://127.0.0.1:{server.grpc_port}"
    with tempfile.TemporaryDirectory() as folder:
        body, log = Path(folder) / "body", Path(folder) / "log"
        body.write_bytes(frame(message.SerializeToString()))
        command = ["taskset", "-c", cores, *h2load_command(url, body, log, concurrency, seconds)]
        before = grpc_outcomes(server)
        cpu_before = server.cpu_seconds()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        cpu = server.cpu_seconds() - cpu_before
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed: {done.stderr or done.stdout}")
        # One line per call: start (µs since the epoch), HTTP status (-1: failed), µs taken.
        calls = [line.split("\t")[1:3] for line in log.read_text().splitlines()]
    succeeded, measured = parse_summary(done.stdout)
    # A server may count a call just after answering it, and a cancelled one when it notices.
    time.sleep(0.2)
    counted = grpc_outcomes(server) - before
    errors = {code: n for code, n in counted.items() if code not in (OK, CANCELLED)}
    micros = np.asarray([int(taken) for status, taken in calls if status == "200"], dtype=float)
    failed_streams = len(calls) - len(micros)
    if (
        errors
        or failed_streams
        or succeeded == 0
        or counted[OK] < succeeded
        or counted[CANCELLED] > concurrency
    ):
        raise RuntimeError(
            f"{server.name} gRPC {message.model_name}: errors or unanswered calls: h2load "
            f"counted {succeeded} succeeded and {failed_streams} failed streams, the server "
            f"{dict(counted)}; see {server.log}"
        )
    return Load(
        requests=succeeded,
        seconds=measured,
        p50_ms=float(np.percentile(micros, 50)) / 1000,
        p99_ms=float(np.percentile(micros, 99)) / 1000,
        cpu_us_per_request=cpu * 1e6 / succeeded,
    )
