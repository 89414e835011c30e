"""python -m bench.online.profile MODEL VERSION ROWS ENCODING CONNECTIONS: where time goes.

Starts modelserve pinned to core 0, loads it with wrk from core 1 (with --grpc: h2load, typed
contents for the json encoding and raw contents for binary), samples it with py-spy meanwhile,
and prints the functions with the most samples (own and inclusive time). The collapsed stacks
are kept under bench/results/ for flame graphs.
"""

import argparse
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench.online.h2load import run_h2load
from bench.online.messages import infer_request
from bench.online.raw import load_runtime
from bench.online.servers import ROOT, Server, prepare_repository, start_modelserve
from bench.online.workload import Artifact, build_request, features
from bench.online.wrk import Load, run_wrk
from service.store.runtimes import RuntimeOptions


def summarise(collapsed: Path, top: int) -> str:
    """Sample shares per thread, and own and inclusive shares per function, from py-spy."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # py-spy writes a frame named by source text with newlines
            continue  # over several lines: that sample is left out
        thread, *calls = stack.split(";")
        frames = [f.split(" (")[0] + " " + f.rsplit("/", 1)[-1] for f in calls] or ["?"]
        samples = int(count)
        total += samples
        threads[thread] += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples", "", "threads:"]
    lines += [f"{100 * n / total:5.1f}%  {t}" for t, n in threads.most_common()]
    lines += ["", "own time:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.online.profile", description=__doc__)
    parser.add_argument("model", choices=["iris", "iris_int", "breast_cancer"])
    parser.add_argument("version", type=int, choices=[1, 2])
    parser.add_argument("rows", type=int)
    parser.add_argument("encoding", choices=["json", "binary"])
    parser.add_argument("connections", type=int)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument("--grpc", action="store_true", help="call ModelInfer over gRPC")
    parser.add_argument(
        "--gil", action="store_true", help="only samples holding the GIL: Python on the CPU"
    )
    args = parser.parse_args()
    work = ROOT / "bench" / ".work"
    work.mkdir(parents=True, exist_ok=True)
    repository, _ = prepare_repository(work)
    artifact = Artifact(args.model, args.version)
    data = features(args.model, args.rows)
    runtime = load_runtime(repository, artifact, RuntimeOptions())
    label = str(runtime.predict({"input": data[:1]}).outputs["label"][0])
    request = build_request("modelserve", artifact, data, label, args.encoding)
    message = infer_request(
        "modelserve", artifact, data, "raw" if args.encoding == "binary" else "contents"
    )

    def load_with(server: Server, seconds: float) -> Load:
        if args.grpc:
            return run_h2load(server, message, args.connections, seconds)
        return run_wrk(server, request, args.connections, seconds)

    protocol = "-grpc" if args.grpc else ""
    name = (
        f"profile{protocol}-{args.model}-v{args.version}-{args.rows}-{args.encoding}"
        f"-c{args.connections}"
    )
    collapsed = ROOT / "bench" / "results" / f"{name}.collapsed.txt"
    server = start_modelserve("modelserve", repository, work)
    try:
        load_with(server, 1.0)  # warm up
        command = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw"]
        command += ["--pid", str(server.process.pid), "--rate", "500"]
        # py-spy reads native stacks only from a stopped process
        command += [] if args.native else ["--nonblocking"]
        command += ["--threads"]  # each stack starts with its thread, to split loop and model
        command += ["--duration", str(int(args.seconds)), "--output", str(collapsed)]
        command += ["--native"] if args.native else []
        command += ["--gil"] if args.gil else []
        sampler = threading.Thread(target=subprocess.run, args=(command,), kwargs={"check": True})
        sampler.start()
        load = load_with(server, args.seconds)
        sampler.join()
    finally:
        server.stop()
    print(
        f"{load.rate:,.0f} req/s, p50 {load.p50_ms:.2f} ms, "
        f"CPU {load.cpu_us_per_request:.0f} µs/req"
    )
    print(summarise(collapsed, args.top))


if __name__ == "__main__":
    main()
