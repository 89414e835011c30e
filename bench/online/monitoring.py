"""python -m bench.online.monitoring: what drift and a shadow cost the requests they watch.

One modelserve from this tree in several configurations, each pinned to core 0 with wrk on
core 1, measured in one run and in alternating order:
- `default`: as shipped (drift on, no shadow);
- `drift off`: `MODELSERVE_DRIFT_WINDOW_ROWS=0`;
- `shadow 10%` and `shadow 100%`: that share of iris version 2's requests mirrored to version 1
  (`[shadow]` in model.toml), compared off the response path;
- `payload log 100%`: every request and its answer written to a JSON-lines file
  (`MODELSERVE_PAYLOAD_LOG_RATE=1`), off the response path.
Per repetition: server CPU per single-row request and requests/s at c=64 (iris ONNX, JSON),
rows/s of 10,000-row binary requests, and the primary's latency at c=1 (p50 and p99), the last
from short mirrored runs (a, b, b, a, ...) so that drift of the machine falls on every side.
Medians of the repetitions go to bench/results/monitoring.md, with each figure as a ratio to
`default` measured in the same repetition.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.online.__main__ import pinned
from bench.online.raw import load_runtime
from bench.online.servers import ROOT, Server, prepare_repository, start_modelserve
from bench.online.workload import Artifact, Request, build_request
from bench.online.workload import features as make_features
from bench.online.wrk import run_wrk
from service.store.runtimes import RuntimeOptions

ARTIFACT = Artifact("iris", 2)
DEFAULT, DRIFT_OFF, SHADOW_10, SHADOW_100 = "default", "drift off", "shadow 10%", "shadow 100%"
PAYLOADS = "payload log 100%"
Figures = dict[str, float]


def shadowed_copy(repository: Path, work: Path, fraction: float = 1.0) -> Path:
    """The repository with that fraction of iris version 2's requests mirrored to version 1."""
    copy = work / f"models-shadow-{fraction:g}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(repository, copy)
    config = copy / "iris" / "model.toml"
    config.write_text(
        config.read_text() + f"\n[shadow]\nsource = 2\ntarget = 1\nfraction = {fraction}\n"
    )
    return copy


def shadowed_requests(server: Server) -> float:
    """Mirrored requests the server counted, whatever their outcome."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("modelserve_shadow_requests_total{")
    )


def requests_for(repository: Path) -> tuple[Request, Request]:
    runtime = load_runtime(repository, ARTIFACT, RuntimeOptions())
    one = make_features("iris", 1)
    label = str(runtime.predict({"input": one}).outputs["label"][0])
    single = build_request("modelserve", ARTIFACT, one, label, "json")
    bulk = build_request("modelserve", ARTIFACT, make_features("iris", 10_000), label, "binary")
    return single, bulk


def _latency_at_c1(
    servers: dict[str, Server], single: Request, seconds: float
) -> dict[str, Figures]:
    """p50 and p99 at c=1, the medians of short runs in mirrored order."""
    names = list(servers)
    order = (names + names[::-1]) * 3
    p50: dict[str, list[float]] = {name: [] for name in names}
    p99: dict[str, list[float]] = {name: [] for name in names}
    for name in order:
        load = run_wrk(servers[name], single, 1, seconds)
        p50[name].append(load.p50_ms)
        p99[name].append(load.p99_ms)
    return {
        n: {"c1_p50_ms": statistics.median(p50[n]), "c1_p99_ms": statistics.median(p99[n])}
        for n in names
    }


def measure(
    servers: dict[str, Server], repository: Path, repeat: int, seconds: float
) -> list[dict[str, Figures]]:
    single, bulk = requests_for(repository)
    for server in servers.values():  # warm up, and fail early on a wrong answer
        run_wrk(server, single, 8, 1.0)
        run_wrk(server, bulk, 1, 1.0)
    reps: list[dict[str, Figures]] = []
    for rep in range(repeat):
        names = list(servers)
        order = names[rep % len(names) :] + names[: rep % len(names)]
        figures: dict[str, Figures] = {name: {} for name in names}
        for name in order:
            c64 = run_wrk(servers[name], single, 64, seconds)
            large = run_wrk(servers[name], bulk, 1, seconds)
            figures[name].update(
                cpu_us=c64.cpu_us_per_request,
                rate=c64.rate,
                c64_p99_ms=c64.p99_ms,
                bulk_rows_per_s=large.rate * 10_000,
            )
        for name, latency in _latency_at_c1(servers, single, min(1.0, seconds)).items():
            figures[name].update(latency)
        reps.append(figures)
        print(json.dumps({"rep": rep, **figures}), flush=True)
    return reps


def summarise(reps: list[dict[str, Figures]]) -> dict[str, dict[str, float]]:
    """Per configuration: the median of each figure and of its ratio to `default`."""
    summary: dict[str, dict[str, float]] = {}
    for name in reps[0]:
        row: dict[str, float] = {}
        for key in reps[0][name]:
            row[key] = statistics.median(r[name][key] for r in reps)
            row[f"{key}_ratio"] = statistics.median(r[name][key] / r[DEFAULT][key] for r in reps)
        summary[name] = row
    return summary


def render(summary: dict[str, dict[str, float]], repeat: int, seconds: float) -> str:
    columns: list[tuple[str, str, Callable[[float], str]]] = [
        ("cpu_us", "CPU µs/request (c=64)", lambda v: f"{v:.0f}"),
        ("rate", "requests/s (c=64)", lambda v: f"{v:,.0f}"),
        ("c1_p50_ms", "p50 ms (c=1)", lambda v: f"{v:.3f}"),
        ("c1_p99_ms", "p99 ms (c=1)", lambda v: f"{v:.3f}"),
        ("bulk_rows_per_s", "rows/s (10,000-row binary)", lambda v: f"{v:,.0f}"),
    ]
    lines = [
        "# Monitoring overhead: drift and shadow against the shipped configuration",
        "",
        f"`python -m bench.online.monitoring --repeat {repeat} --seconds {seconds:g}`: iris "
        "ONNX (version 2), server on core 0, wrk on core 1; medians of the repetitions, and in "
        "brackets the median ratio to `default` taken within each repetition. `drift off` is "
        "`MODELSERVE_DRIFT_WINDOW_ROWS=0`; `shadow 10%`/`100%` mirror that share of version 2's "
        "requests to version 1 (scikit-learn, several times version 2's CPU per row) and "
        "compare the answers; the shadow's CPU is spent on the same core, so requests/s at "
        "c=64 fall by what it costs. `payload log 100%` writes every request and answer to "
        "a JSON-lines file (rotated at 100 MiB).",
        "",
        "| configuration | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in summary.items():
        cells = [f"{show(row[key])} ({row[f'{key}_ratio']:.2f})" for key, _, show in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelserve-monitoring-"))
    repository, _ = prepare_repository(work)
    starts: dict[str, Callable[[], Server]] = {
        DEFAULT: lambda: start_modelserve("default", repository, work),
        DRIFT_OFF: lambda: start_modelserve(
            "drift-off", repository, work, env={"MODELSERVE_DRIFT_WINDOW_ROWS": "0"}
        ),
        SHADOW_10: lambda: start_modelserve(
            "shadow-10", shadowed_copy(repository, work, 0.1), work
        ),
        SHADOW_100: lambda: start_modelserve(
            "shadow-100", shadowed_copy(repository, work, 1.0), work
        ),
        PAYLOADS: lambda: start_modelserve(
            "payloads",
            repository,
            work,
            env={
                "MODELSERVE_PAYLOAD_LOG_RATE": "1",
                "MODELSERVE_PAYLOAD_LOG_FILE": str(work / "payloads.jsonl"),
            },
        ),
    }
    started = time.time()
    servers: dict[str, Server] = {}
    try:
        for name, start in starts.items():
            servers[name] = start()
        with pinned({1}):
            reps = measure(servers, repository, args.repeat, args.seconds)
        for name in (SHADOW_10, SHADOW_100):
            if not shadowed_requests(servers[name]):
                raise RuntimeError(f"{name} mirrored no request; see {servers[name].log}")
        if not (work / "payloads.jsonl").stat().st_size:
            raise RuntimeError(f"{PAYLOADS} wrote no record; see {servers[PAYLOADS].log}")
    finally:
        for server in servers.values():
            server.stop()
    summary = summarise(reps)
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(summary, args.repeat, args.seconds)
    text += f"\nRun of {(time.time() - started) / 60:.1f} minutes.\n"
    (args.out / "monitoring.md").write_text(text)
    (args.out / "monitoring.raw.json").write_text(json.dumps(reps, indent=1))
    print(text)


if __name__ == "__main__":
    main()
