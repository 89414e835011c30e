"""Batch scoring speed and memory: `modelserve score`, `:score` and a batch job against a script.

The yardstick is the best short script for the job: pyarrow reads the CSV (all cores),
onnxruntime scores it in batches of 100,000 rows (all cores), pyarrow writes the input with
the prediction columns. It runs on the same file in the same run as the CLI and the HTTP
endpoint, interleaved, so machine noise hits all of them alike; each figure is the median of
`--runs` runs, as wall time of a fresh process (the CLI, the yardstick) or of one request to a
running server (HTTP); the script's own time without interpreter start and imports is shown
too, as the strictest yardstick. Raw onnxruntime rows/s (the model call alone, in memory) is beside
them, to show how much of the time is parsing and writing. A bigger file (`--big-rows`, 10 M by
default) is scored with `--workers 1` and `--workers 2`, interleaved, to show how the command
scales with cores, with the peak memory of the command's processes. The load average of the
machine before and after is part of the report: the runs are only comparable on a quiet one.

    python bench/scoring.py [--rows 1000000] [--runs 3] [--big-rows 10000000] [--rss-gb 1]
                            [--output FILE.md]
"""

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]

YARDSTICK = """
import sys, time
import numpy as np, pyarrow as pa, pyarrow.csv as csv, onnxruntime as ort
started = time.perf_counter()
source, model, target = sys.argv[1:4]
features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
classes = ["setosa", "versicolor", "virginica"]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
table = csv.read_csv(source)
X = np.column_stack([table[f].to_numpy().astype(np.float32) for f in features])
labels, probabilities = [], []
for start in range(0, len(X), 100_000):
    label, probability = session.run(None, {"input": X[start:start + 100_000]})
    labels.append(label)
    probabilities.append(probability)
probability = np.concatenate(probabilities)
table = table.append_column("label", pa.array(np.concatenate(labels)))
for i, name in enumerate(classes):
    table = table.append_column(f"probability_{name}", pa.array(probability[:, i]))
csv.write_csv(table, target)
print(time.perf_counter() - started)
"""


def write_csv(path: Path, rows: int = 0, target_bytes: int = 0) -> int:
    """Iris-like rows with an id: `rows` of them, or as many as make `target_bytes`."""
    rng = np.random.default_rng(0)
    data = rng.normal([5.8, 3.0, 3.7, 1.2], [0.8, 0.4, 1.7, 0.7], (100_000, 4)).round(1).tolist()
    written = 0
    with path.open("w") as out:
        out.write("id," + ",".join(FEATURES) + "\n")
        while (rows and written < rows) or (target_bytes and out.tell() < target_bytes):
            count = min(len(data), rows - written) if rows else len(data)
            out.writelines(
                f"{written + i},{a},{b},{c},{d}\n" for i, (a, b, c, d) in enumerate(data[:count])
            )
            written += count
    return written


def timed(command: list[str]) -> tuple[float, str]:
    """Wall time of a fresh process, and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return time.perf_counter() - started, done.stdout


def _pss_mb(pid: int) -> float:
    """A process's proportional set size: its pages, shared ones split among their sharers."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _tree_pss_mb(root: int) -> float:
    """The memory of a process and its descendants (pages shared after fork counted once)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):  # it ended meanwhile
            total += _pss_mb(pid)
    return total


def timed_with_memory(command: list[str]) -> tuple[float, float]:
    """Wall time of a fresh process, and the peak memory of it and its workers (PSS, MB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _tree_pss_mb(process.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    return seconds, peak


def post_file(url: str, source: Path, target: Path) -> float:
    """One streamed request; curl sends and reads at once, as a batch client should."""
    started = time.perf_counter()
    curl = shutil.which("curl")
    if curl:
        subprocess.run(
            [curl, "-sS", "--fail", "-X", "POST", "-T", str(source), "-H", "Content-Type: text/csv",
             "-o", str(target), url],
            check=True,
        )  # fmt: skip
    else:
        import httpx

        with (
            source.open("rb") as body,
            target.open("wb") as out,
            httpx.stream(
                "POST", url, content=body, headers={"content-type": "text/csv"}, timeout=3600
            ) as r,
        ):
            r.raise_for_status()
            for chunk in r.iter_bytes():
                out.write(chunk)
    return time.perf_counter() - started


def raw_onnxruntime(model: Path, rows: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    X = rng.normal([5.8, 3.0, 3.7, 1.2], [0.8, 0.4, 1.7, 0.7], (rows, 4)).astype(np.float32)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, rows, 100_000):
            session.run(None, {"input": X[start : start + 100_000]})
        times.append(time.perf_counter() - started)
    return rows / statistics.median(times)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure_rss(repository: Path, folder: Path, gigabytes: float) -> dict[str, float]:
    from tests.serving import run_server

    source = folder / "big.csv"
    rows = write_csv(source, 0, int(gigabytes * 2**30))
    target = folder / "big-out.csv"
    with run_server(repository, folder) as server:
        pid = server.process.pid
        url = f"{server.url}/v1/models/iris/versions/2:score"
        post_file(url, folder / "small.csv", target)
        idle = rss_mb(pid)
        peak = idle
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_mb(pid))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch)
        watcher.start()
        seconds = post_file(url, source, target)
        done.set()
        watcher.join()
    with target.open("rb") as out:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: out.read(1 << 24), b""))
    size = source.stat().st_size
    source.unlink()
    target.unlink()
    assert lines == rows + 1, (lines, rows)
    return {"bytes": size, "rows": rows, "idle": idle, "peak": peak, "seconds": seconds}


def run_job(url: str, source: Path, target: Path) -> float:
    """A batch job end to end: submit the file, poll until it ends, download the result."""
    import httpx

    started = time.perf_counter()
    with source.open("rb") as body:
        submitted = httpx.post(
            f"{url}/v1/jobs?model=iris&version=2",
            content=body,
            headers={"content-type": "text/csv"},
            timeout=3600,
        )
    submitted.raise_for_status()
    job = submitted.json()
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.05)
        job = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
    if job["state"] != "succeeded":
        raise RuntimeError(f"the job ended {job['state']}: {job['error']}")
    with httpx.stream("GET", f"{url}{job['result']}", timeout=3600) as r, target.open("wb") as out:
        for chunk in r.iter_bytes():
            out.write(chunk)
    return time.perf_counter() - started


def _latencies_ms(client: "httpx.Client", url: str, until: Callable[[], bool]) -> list[float]:
    """Single-row V2 requests one after another until `until()`; their latencies."""
    body = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2]}]}  # fmt: skip
    found: list[float] = []
    while not until():
        started = time.perf_counter()
        client.post(url, json=body).raise_for_status()
        found.append((time.perf_counter() - started) * 1000)
    return found


def online_during_job(url: str, source: Path, target: Path, seconds: float) -> dict[str, float]:
    """Single-row p50/p99 on an idle server for `seconds`, then while a job scores `source`."""
    import httpx

    infer = f"{url}/v2/models/iris/versions/2/infer"
    with httpx.Client(timeout=30) as client:
        end = time.monotonic() + seconds
        idle = _latencies_ms(client, infer, lambda: time.monotonic() > end)
        done = threading.Event()

        def score() -> None:
            try:
                run_job(url, source, target)
            finally:
                done.set()

        job = threading.Thread(target=score)
        job.start()
        time.sleep(0.5)  # past the upload: the job is scoring
        busy = _latencies_ms(client, infer, done.is_set)
        job.join()
    return {
        "idle_p50": float(np.percentile(idle, 50)),
        "idle_p99": float(np.percentile(idle, 99)),
        "busy_p50": float(np.percentile(busy, 50)),
        "busy_p99": float(np.percentile(busy, 99)),
        "busy_requests": float(len(busy)),
    }


def cli_command(repository: Path, source: Path, target: Path) -> list[str]:
    return [
        sys.executable, "-m", "service", "score", "iris:2", str(source), str(target),
        "--model-repository", str(repository),
    ]  # fmt: skip


def measure_workers(repository: Path, folder: Path, rows: int, runs: int) -> dict[str, list[float]]:
    """`--workers 1` against `--workers 2` on a big file: wall seconds of plain runs, then the
    peak memory (MB) of one more run each, sampled (sampling slows what it samples)."""
    source = folder / "big.csv"
    write_csv(source, rows)
    cli = cli_command(repository, source, folder / "big-out.csv")
    found: dict[str, list[float]] = {"1": [], "2": [], "memory-1": [], "memory-2": []}
    for _ in range(runs):
        for workers in ("1", "2"):
            found[workers].append(timed([*cli, "--workers", workers])[0])
    for workers in ("1", "2"):
        found[f"memory-{workers}"].append(timed_with_memory([*cli, "--workers", workers])[1])
    source.unlink()
    (folder / "big-out.csv").unlink()
    return found


NAMES = {
    "yardstick": "hand-written script (pyarrow + onnxruntime, all cores), as a process",
    "yardstick-inside": "the same script without interpreter start and imports",
    "cli-2": "`modelserve score --workers 2`",
    "cli-1": "`modelserve score --workers 1`",
    "http": "`POST /v1/models/iris/versions/2:score` (curl)",
    "job": "batch job: `POST /v1/jobs`, poll, download the result",
}


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{value:.2f}" for value in load)


def report(
    args: argparse.Namespace,
    size_mb: float,
    times: dict[str, list[float]],
    raw: float,
    big: dict[str, list[float]] | None,
    loads: tuple[tuple[float, float, float], tuple[float, float, float]],
) -> list[str]:
    rates = {name: args.rows / statistics.median(values) for name, values in times.items()}
    base = rates["yardstick"]
    command = f"python bench/scoring.py --rows {args.rows} --runs {args.runs}"
    command += f" --big-rows {args.big_rows}"
    command += f" --rss-gb {args.rss_gb:g}" if args.rss_gb else ""
    lines = [
        "# Batch scoring benchmark",
        "",
        f"{args.rows:,}-row iris CSV (id + 4 features, {size_mb:.0f} MB), iris ONNX model "
        f"(version 2), {len(os.sched_getaffinity(0))} cores; median of {args.runs} runs, "
        "interleaved. "
        f"Command: `{command}`. Load average (1 / 5 / 15 min) {_load(loads[0])} before, "
        f"{_load(loads[1])} after.",
        "",
        "| target | wanted | measured |",
        "|---|---:|---:|",
        f"| `modelserve score` (one worker per core) / the script, rows/s | ≥ 1.30 "
        f"| {rates['cli-2'] / base:.2f} |",
        f"| `:score` over HTTP / the script, rows/s | ≥ 1.00 | {rates['http'] / base:.2f} |",
    ]
    if big:
        speedup = statistics.median(big["1"]) / statistics.median(big["2"])
        lines.append(
            f"| {args.big_rows:,} rows: `--workers 2` / `--workers 1`, rows/s | ≥ 1.60 "
            f"| {speedup:.2f} |"
        )
    lines += ["", "| path | rows/s | of the script | runs (s) |", "|---|---:|---:|---|"]
    for key, label in NAMES.items():
        runs = ", ".join(f"{t:.2f}" for t in times[key])
        lines.append(f"| {label} | {rates[key]:,.0f} | {rates[key] / base:.0%} | {runs} |")
    lines.append(
        f"| raw onnxruntime call only (in memory, no parsing or writing) | {raw:,.0f} "
        f"| {raw / base:.0%} | |"
    )
    if big:
        lines += [
            "",
            f"{args.big_rows:,}-row CSV, `modelserve score` as a whole command:",
            "",
            "| workers | rows/s | runs (s) | peak memory of its processes (PSS, MB) |",
            "|---|---:|---|---:|",
        ]
        for workers in ("1", "2"):
            rate = args.big_rows / statistics.median(big[workers])
            runs = ", ".join(f"{t:.2f}" for t in big[workers])
            lines.append(
                f"| `--workers {workers}` | {rate:,.0f} | {runs} "
                f"| {max(big[f'memory-{workers}']):.0f} |"
            )
    return lines + NOTES


NOTES = [
    "",
    "Reading the tables:",
    "",
    "- The CLI and the script are timed as fresh processes: interpreter start, imports, model",
    "  load and exit are in every figure. The HTTP figure is one request to a running server.",
    "- `modelserve score` gives each worker a byte range of the file; nothing reads the file",
    "  before they start, and their part files are joined without being decoded again.",
    "- Two workers need two idle cores: under load (see the load average above) `--workers 2`",
    "  is no faster than `--workers 1`, and every figure is slower than on a quiet machine.",
    "- Memory is the summed PSS of the command's processes, sampled every 50 ms in a run of its",
    "  own (the sampling slows the command): it does not grow with the file, as every worker",
    "  holds one chunk at a time.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--big-rows", type=int, default=10_000_000, help="--workers 1 against 2 (0: skip)"
    )
    parser.add_argument("--rss-gb", type=float, default=0.0, help="also stream a file this big")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "scoring.md")
    args = parser.parse_args()

    from tests.serving import run_server
    from training.examples import train_examples

    # Every core of the machine, whatever this process inherited: the commands are to use them.
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-scoring-", dir=ROOT / "bench") as tmp:
        folder = Path(tmp)
        repository = folder / "models"
        shutil.copytree(ROOT / "models", repository, ignore=shutil.ignore_patterns("[0-9]*"))
        train_examples(repository)
        model = repository / "iris" / "2" / "model.onnx"
        source = folder / "iris.csv"
        write_csv(source, args.rows)
        size_mb = source.stat().st_size / 2**20
        write_csv(folder / "small.csv", 1000)
        yardstick = folder / "yardstick.py"
        yardstick.write_text(YARDSTICK)
        times: dict[str, list[float]] = {name: [] for name in NAMES}
        cli = cli_command(repository, source, folder / "cli.csv")
        with run_server(repository, folder) as server:
            url = f"{server.url}/v1/models/iris/versions/2:score"
            post_file(url, folder / "small.csv", folder / "warm.csv")
            run_job(server.url, folder / "small.csv", folder / "warm-job.csv")  # starts the pool
            for _ in range(args.runs):
                wall, inside = timed(
                    [sys.executable, str(yardstick), str(source), str(model), str(folder / "y.csv")]
                )
                times["yardstick"].append(wall)
                times["yardstick-inside"].append(float(inside))
                times["cli-2"].append(timed([*cli, "--workers", "2"])[0])
                times["cli-1"].append(timed([*cli, "--workers", "1"])[0])
                times["http"].append(post_file(url, source, folder / "http.csv"))
                times["job"].append(run_job(server.url, source, folder / "job.csv"))
            online = online_during_job(server.url, source, folder / "job.csv", 5.0)
        raw = raw_onnxruntime(model, args.rows)
        big = None
        if args.big_rows:
            big = measure_workers(repository, folder, args.big_rows, args.runs)
        rss = measure_rss(repository, folder, args.rss_gb) if args.rss_gb else None
    loads = (load_before, os.getloadavg())

    lines = report(args, size_mb, times, raw, big, loads)
    lines += [
        "",
        f"Online requests while a {args.rows:,}-row job runs (single-row V2 to iris version 2, "
        "one at a time from one client, same server): "
        f"idle p50 {online['idle_p50']:.2f} ms, p99 {online['idle_p99']:.2f} ms; during the job "
        f"p50 {online['busy_p50']:.2f} ms, **p99 {online['busy_p99']:.2f} ms** "
        f"({online['busy_requests']:.0f} requests).",
    ]
    if rss:
        lines += [
            "",
            f"Streaming {rss['bytes'] / 2**30:.2f} GiB ({rss['rows']:,.0f} rows) "
            "through `:score` with curl: "
            f"server RSS {rss['idle']:.0f} MB idle, {rss['peak']:.0f} MB peak "
            f"(**+{rss['peak'] - rss['idle']:.0f} MB**), {rss['seconds']:.0f} s "
            f"({rss['rows'] / rss['seconds']:,.0f} rows/s).",
        ]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
