"""python -m bench.online.compare BASELINE: this tree against another checkout, in one paired run.

A change that should not move the hot path is checked here: the two servers run side by side,
each pinned to core 0 with wrk on core 1, in alternating order, and each repetition yields the
two headline figures of the online benchmark for both: server CPU per single-row request at
c=64 (iris ONNX, JSON) and rows/s of 10,000-row binary requests (iris ONNX). Ratios are taken
within a repetition, so drift of the machine falls on both sides; the medians are reported.
BASELINE is a checkout of the other commit (`git worktree add DIR COMMIT`); its code is served
by this environment's Python, with BASELINE first on the import path.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.online.raw import load_runtime
from bench.online.servers import ROOT, Server, prepare_repository, start_modelserve
from bench.online.workload import Artifact, build_request
from bench.online.workload import features as make_features
from bench.online.wrk import run_wrk
from service.store.runtimes import RuntimeOptions

ARTIFACT = Artifact("iris", 2)


def _measure(server: Server, repository: Path, seconds: float) -> dict[str, float]:
    runtime = load_runtime(repository, ARTIFACT, RuntimeOptions())
    one = make_features("iris", 1)
    label = str(runtime.predict({"input": one}).outputs["label"][0])
    single = build_request("modelserve", ARTIFACT, one, label, "json")
    bulk = build_request("modelserve", ARTIFACT, make_features("iris", 10_000), label, "binary")
    c64 = run_wrk(server, single, 64, seconds)
    large = run_wrk(server, bulk, 1, seconds)
    return {
        "cpu_us": c64.cpu_us_per_request,
        "rate": c64.rate,
        "bulk_rows_per_s": large.rate * 10_000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", type=Path, help="a checkout of the commit to compare with")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelserve-compare-"))
    repository, _ = prepare_repository(work)
    # Each server imports its own tree first (the servers run from a work folder, where the
    # installed package would otherwise be found).
    env = {
        "baseline": {"PYTHONPATH": str(args.baseline.resolve())},
        "current": {"PYTHONPATH": str(ROOT)},
    }
    rows: list[dict[str, float]] = []
    for rep in range(args.repeat):
        order = ["baseline", "current"] if rep % 2 == 0 else ["current", "baseline"]
        result: dict[str, dict[str, float]] = {}
        for name in order:
            server = start_modelserve(name, repository, work, env=env[name])
            try:
                result[name] = _measure(server, repository, args.seconds)
            finally:
                server.stop()
        row = {f"{name}_{key}": value for name, r in result.items() for key, value in r.items()}
        row["cpu_ratio"] = result["current"]["cpu_us"] / result["baseline"]["cpu_us"]
        bulk = result["current"]["bulk_rows_per_s"] / result["baseline"]["bulk_rows_per_s"]
        row["bulk_ratio"] = bulk
        rows.append(row)
        print(json.dumps(row), flush=True)
    medians = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(json.dumps({"median": medians}, indent=1))


if __name__ == "__main__":
    main()
