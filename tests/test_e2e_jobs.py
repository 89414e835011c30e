"""Batch jobs through real server processes: submit, poll, download, cancel, crash and resume."""

import asyncio
import logging
import multiprocessing
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

from service.config import Settings
from service.jobs.parts import JOB_NICENESS, close_pool, new_pool
from service.jobs.runner import execute, run_jobs
from service.jobs.store import Job, JobStore
from tests.serving import RunningServer, run_server, stop, wait_for

ROWS = 30_000
BIG_ROWS = 600_000
# Five times big.csv: a job of several seconds. A test that acts on a running job uses it, so
# that the job cannot finish between the test seeing it run and acting on it.
HUGE_ROWS = 5 * BIG_ROWS
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def write_iris_csv(path: Path, rows: int) -> Path:
    data = np.resize(load_iris().data, (rows, 4))
    lines = ["id,petal_width,sepal_length,petal_length,sepal_width"]
    lines += [f"{i:07d},{r[3]},{r[0]},{r[2]},{r[1]}" for i, r in enumerate(data.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return path


def score_offline(repository: Path, model: str, source: Path, target: Path) -> bytes:
    command = [sys.executable, "-m", "service", "score", model, str(source), str(target)]
    command += ["--model-repository", str(repository)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return target.read_bytes()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    write_iris_csv(folder / "iris.csv", ROWS)
    write_iris_csv(folder / "big.csv", BIG_ROWS)
    header, _, rows = (folder / "big.csv").read_bytes().partition(b"\n")
    (folder / "huge.csv").write_bytes(header + b"\n" + rows * 5)
    return folder


def huge_expected(expected: dict[str, bytes]) -> bytes:
    header, _, rows = expected["big"].partition(b"\n")
    return header + b"\n" + rows * 5


@pytest.fixture(scope="module")
def expected(trained_repository: Path, inputs: Path) -> dict[str, bytes]:
    """What `modelserve score` writes for the same files: the reference a job must match."""
    out = inputs.parent / "expected"
    out.mkdir(exist_ok=True)
    return {
        "iris:2": score_offline(trained_repository, "iris:2", inputs / "iris.csv", out / "a.csv"),
        "iris:1": score_offline(trained_repository, "iris:1", inputs / "iris.csv", out / "b.csv"),
        "big": score_offline(trained_repository, "iris:2", inputs / "big.csv", out / "c.csv"),
    }


def jobs_env(jobs: Path, inputs: Path, **extra: str) -> dict[str, str]:
    return {
        "MODELSERVE_JOBS_DIR": str(jobs),
        "MODELSERVE_JOBS_INPUT_ROOTS": str(inputs),
        # Small parts, so that a job has several and a restart has some left to do.
        "MODELSERVE_JOBS_PART_BYTES": "200000",
        **extra,
    }


@pytest.fixture(scope="module")
def jobs_server(
    trained_repository: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    jobs = tmp_path_factory.mktemp("jobs")
    with run_server(
        trained_repository, tmp_path_factory.mktemp("jobs-logs"), env=jobs_env(jobs, inputs)
    ) as running:
        yield running


def scrape(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def submit_body(url: str, source: Path, query: str = "model=iris") -> httpx.Response:
    with source.open("rb") as body:
        return httpx.post(
            f"{url}/v1/jobs?{query}",
            content=body,
            headers={"Content-Type": "text/csv"},
            timeout=120,
        )


def wait_state(
    url: str, job_id: str, states: tuple[str, ...], timeout: float = 120
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal seen
        seen = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        return seen["state"] in states

    wait_for(reached, timeout, f"job {job_id} in {states}")
    return seen


def test_a_csv_body_becomes_a_job_whose_result_equals_modelserve_score(
    jobs_server: RunningServer, inputs: Path, expected: dict[str, bytes]
) -> None:
    url = jobs_server.url
    submitted = submit_body(url, inputs / "iris.csv", "model=iris&version=2")
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"] == f"/v1/jobs/{job_id}"
    assert submitted.json()["state"] in ("queued", "running")
    done = wait_state(url, job_id, ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["rows_done"] == done["rows_total"] == ROWS
    assert done["version"] == 2
    assert done["attempts"] == 1
    result = httpx.get(f"{url}{done['result']}", timeout=60)
    assert result.status_code == 200
    assert result.headers["content-type"].startswith("text/csv")
    assert result.content == expected["iris:2"]
    documented = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert set(documented["/v1/jobs/{id}"]) == {"get", "delete"}
    assert "206" in documented["/v1/jobs/{id}/result"]["get"]["responses"]
    listed = httpx.get(f"{url}/v1/jobs?state=succeeded&model=iris", timeout=10).json()
    assert job_id in [job["id"] for job in listed["jobs"]]
    metrics = scrape(url)
    assert metrics[("modelserve_job_rows_total", (("model", "iris"), ("version", "2")))] >= ROWS
    assert metrics[("modelserve_jobs", (("state", "succeeded"),))] >= 1
    assert ("modelserve_jobs", (("state", "queued"),)) in metrics
    assert metrics[("modelserve_job_duration_seconds_count", (("state", "succeeded"),))] >= 1

    # A download resumes where it stopped: one range, a suffix, and one past the end.
    whole = expected["iris:2"]
    part = httpx.get(f"{url}/v1/jobs/{job_id}/result", headers={"Range": "bytes=100-4099"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-4099/{len(whole)}"
    assert part.content == whole[100:4100]
    tail = httpx.get(f"{url}/v1/jobs/{job_id}/result", headers={"Range": "bytes=-50"})
    assert tail.status_code == 206
    assert tail.content == whole[-50:]
    past = httpx.get(f"{url}/v1/jobs/{job_id}/result", headers={"Range": f"bytes={len(whole)}-"})
    assert past.status_code == 416
    assert "past the end" in past.json()["error"]

    # A finished job is deleted with its files.
    assert httpx.delete(f"{url}/v1/jobs/{job_id}").status_code == 204
    gone = httpx.get(f"{url}/v1/jobs/{job_id}")
    assert gone.status_code == 404
    assert job_id in gone.json()["error"]


def test_a_job_on_an_alias_runs_the_version_the_alias_named(
    jobs_server: RunningServer, inputs: Path, expected: dict[str, bytes]
) -> None:
    submitted = submit_body(jobs_server.url, inputs / "iris.csv", "model=iris&version=stable")
    assert submitted.status_code == 202, submitted.text
    done = wait_state(jobs_server.url, submitted.json()["id"], ("succeeded", "failed"))
    assert done["version"] == 1, done
    result = httpx.get(f"{jobs_server.url}{done['result']}", timeout=60)
    assert result.content == expected["iris:1"]


def test_input_path_is_read_under_the_allowed_roots_only(
    jobs_server: RunningServer, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    url = jobs_server.url
    inside = httpx.post(
        f"{url}/v1/jobs", json={"model": "iris", "input_path": str(inputs / "iris.csv")}
    )
    assert inside.status_code == 202, inside.text
    done = wait_state(url, inside.json()["id"], ("succeeded", "failed"))
    assert httpx.get(f"{url}{done['result']}", timeout=60).content == expected["iris:2"]
    assert (inputs / "iris.csv").exists()  # a path's input is the user's: never removed

    outside = tmp_path / "elsewhere.csv"
    outside.write_bytes((inputs / "iris.csv").read_bytes())
    link = inputs / "link.csv"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    for path in (outside, link, inputs / ".." / outside.parent.name / "elsewhere.csv"):
        refused = httpx.post(f"{url}/v1/jobs", json={"model": "iris", "input_path": str(path)})
        assert refused.status_code == 403, (path, refused.text)
        assert "outside the allowed roots" in refused.json()["error"]
    link.unlink()


def test_cancelling_a_running_job_stops_it_and_removes_its_files(
    jobs_server: RunningServer, inputs: Path, tmp_path: Path
) -> None:
    url = jobs_server.url
    submitted = submit_body(url, inputs / "huge.csv")
    job_id = submitted.json()["id"]
    wait_state(url, job_id, ("running",), 60)
    cancelled = httpx.delete(f"{url}/v1/jobs/{job_id}")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] == "cancelled"
    jobs = Path(jobs_env_of(jobs_server)) / job_id
    wait_for(lambda: not any(jobs.glob("*")), 30, "the cancelled job's files removed")
    result = httpx.get(f"{url}/v1/jobs/{job_id}/result")
    assert result.status_code == 409
    assert "cancelled" in result.json()["error"]


def test_progress_shows_rows_rate_and_eta_with_an_estimated_total_until_counted(
    jobs_server: RunningServer, inputs: Path
) -> None:
    url = jobs_server.url
    first = submit_body(url, inputs / "big.csv").json()
    second = submit_body(url, inputs / "big.csv").json()
    for submitted in (first, second):  # estimated from the size and the first MiB's lines
        assert submitted["state"] == "queued"
        assert submitted["rows_total_estimated"] is True, submitted
        assert submitted["rows_total"] == pytest.approx(BIG_ROWS, rel=0.02), submitted
        assert submitted["rows_per_s"] is None
        assert submitted["eta_s"] is None
    # The second waits for the first (a server worker runs one job at a time).
    listed = modelserve_jobs(url, "list", "--state", "queued").stdout.splitlines()
    shown = [line for line in listed if line.startswith(second["id"])]
    assert shown, listed
    assert shown[0].endswith(f"0/~{second['rows_total']}"), shown
    seen: dict[str, Any] = {}
    waiting: dict[str, Any] = {}

    def under_way() -> bool:
        nonlocal seen, waiting
        seen = httpx.get(f"{url}/v1/jobs/{first['id']}", timeout=10).json()
        # Read after the first: if the first was still running, the second was queued then.
        waiting = httpx.get(f"{url}/v1/jobs/{second['id']}", timeout=10).json()
        if seen["state"] == "queued":  # not picked up yet (a worker claims jobs by polling)
            return False
        return bool(seen["state"] != "running" or 0 < seen["rows_done"] < BIG_ROWS)

    wait_for(under_way, 60, "the first job under way")
    assert seen["state"] == "running", seen
    # Counted once the job started: exact, and the rate and ETA come from it.
    assert seen["rows_total"] == BIG_ROWS
    assert seen["rows_total_estimated"] is False
    assert seen["rows_per_s"] > 0
    left = (BIG_ROWS - seen["rows_done"]) / seen["rows_per_s"]
    assert seen["eta_s"] == pytest.approx(left, rel=1e-6)
    # The second still waited, with its estimate.
    assert waiting["state"] == "queued", waiting
    assert waiting["rows_total_estimated"] is True
    # The first may finish before its DELETE arrives (204: removed rather than cancelled).
    for job in (second, first):
        removed = httpx.delete(f"{url}/v1/jobs/{job['id']}", timeout=10)
        assert removed.status_code in (200, 204), removed.text
        if removed.status_code == 200:
            assert removed.json()["state"] == "cancelled"


def jobs_env_of(server: RunningServer) -> str:
    for line in server.output().splitlines():
        if "jobs in " in line:
            return line.rsplit("jobs in ", 1)[1].strip()
    raise AssertionError("the server did not log its jobs folder")


def test_a_submission_past_the_disk_limit_answers_507_and_old_jobs_expire(
    trained_repository: Path, inputs: Path, tmp_path: Path
) -> None:
    env = jobs_env(
        tmp_path / "jobs",
        inputs,
        MODELSERVE_JOBS_MAX_BYTES="300000",
        MODELSERVE_JOBS_RETENTION_S="2",
    )
    with run_server(trained_repository, tmp_path, env=env) as running:
        refused = submit_body(running.url, inputs / "big.csv")
        assert refused.status_code == 507, refused.text
        assert "MODELSERVE_JOBS_MAX_BYTES" in refused.json()["error"]
        # Streamed without a declared length, it is refused as it passes the limit. Only a
        # little over the limit is sent, so the whole body is written before the answer and
        # the client never writes to a connection the server has closed.
        chunks = (inputs / "big.csv").read_bytes()
        streamed = httpx.post(
            f"{running.url}/v1/jobs?model=iris",
            content=iter([chunks[i : i + 65536] for i in range(0, 400_000, 65536)]),
            headers={"Content-Type": "text/csv"},
        )
        assert streamed.status_code == 507, streamed.text
        assert httpx.get(f"{running.url}/v1/jobs").json()["jobs"] == []

        # Finished jobs are removed with their files once past MODELSERVE_JOBS_RETENTION_S.
        small = write_iris_csv(tmp_path / "small.csv", 1000)
        job_id = submit_body(running.url, small).json()["id"]
        assert wait_state(running.url, job_id, ("succeeded", "failed"))["state"] == "succeeded"
        wait_for(
            lambda: httpx.get(f"{running.url}/v1/jobs/{job_id}").status_code == 404,
            30,
            "the job removed after its retention",
        )
        assert not (tmp_path / "jobs" / job_id).exists()


def test_a_job_killed_mid_run_resumes_after_a_restart_with_every_row_once(
    trained_repository: Path, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    env = jobs_env(tmp_path / "jobs", inputs)
    with run_server(trained_repository, tmp_path, env=env) as running:
        job_id = submit_body(running.url, inputs / "huge.csv").json()["id"]
        wait_for(
            lambda: httpx.get(f"{running.url}/v1/jobs/{job_id}").json()["rows_done"] > 0,
            60,
            "the job under way",
        )
        running.process.kill()
        running.process.wait()
    with run_server(trained_repository, tmp_path, env=env) as restarted:
        done = wait_state(restarted.url, job_id, ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        assert done["rows_done"] == HUGE_ROWS
        result = httpx.get(f"{restarted.url}{done['result']}", timeout=120)
        assert result.content == huge_expected(expected)


@pytest.mark.parametrize(
    ("cancelled", "workers"),
    [(False, "1"), (True, "1"), (False, "2")],
    ids=["running", "cancelled", "running-2-workers"],
)
def test_a_server_stopped_mid_job_exits_promptly_and_a_restart_finishes_the_job(
    trained_repository: Path,
    inputs: Path,
    expected: dict[str, bytes],
    tmp_path: Path,
    cancelled: bool,
    workers: str,
) -> None:
    env = jobs_env(tmp_path / "jobs", inputs)
    # With --workers 2 a worker process ends at once after its application shut down: the
    # job was left `running` under a dead owner until the job runner was waited for.
    args = ("--workers", workers)
    with run_server(trained_repository, tmp_path, env=env, args=args) as running:
        job_id = submit_body(running.url, inputs / "huge.csv").json()["id"]
        wait_for(
            lambda: httpx.get(f"{running.url}/v1/jobs/{job_id}").json()["rows_done"] > 0,
            60,
            "the job under way",
        )
        asked = time.time()
        if cancelled:
            assert httpx.delete(f"{running.url}/v1/jobs/{job_id}").status_code == 200
        # Parts not yet started are cancelled by the stopping server; the job's thread must
        # not wait for them forever (it did: the server hung until killed), nor let them run
        # (the pool scored them one after another: 3 s here, 15 s on a 1 GB input).
        stopping = time.monotonic()
        assert stop(running.process, timeout=10), "the server had not exited 10 s after SIGTERM"
        took = time.monotonic() - stopping
        said = running.output()
        # The job stops within 0.1-0.5 s of the cancel or the SIGTERM, about 0.4 s on a busy
        # core (1.4-1.7 s when queued parts ran to their first heartbeat). The server then
        # waits for its job processes to exit: they run at a lower priority (JOB_NICENESS), so
        # on a busy machine that alone takes seconds.
        ended = logged_at(said, "stopped: cancelled" if cancelled else "handed back to the queue")
        assert ended - asked < 1.2, f"the job stopped {ended - asked:.1f} s after it was asked to"
        assert took < 8, f"the server took {took:.1f} s to stop"
        assert "leaked semaphore" not in said, said  # the pool's processes ended before it
    if cancelled:
        return
    with run_server(trained_repository, tmp_path, env=env) as restarted:
        done = wait_state(restarted.url, job_id, ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        result = httpx.get(f"{restarted.url}{done['result']}", timeout=120)
        assert result.content == huge_expected(expected)


def logged_at(log: str, phrase: str) -> float:
    """When the first log line with `phrase` was written, as a time.time() value."""
    line = next((line for line in log.splitlines() if phrase in line), None)
    assert line is not None, f"no line with {phrase!r} in:\n{log}"
    stamp = datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=UTC).timestamp()


def pool_processes(server: int) -> list[int]:
    """The job pool's processes of a one-worker server: its spawned children."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or (entry / "stat").read_text().split()[3] != str(server):
                continue
            if b"spawn_main" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return found


def test_a_job_survives_sigterm_to_its_processes_and_a_killed_one_fails_only_its_job(
    trained_repository: Path, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    env = jobs_env(tmp_path / "jobs", inputs)
    with run_server(trained_repository, tmp_path, env=env) as running:
        url, pid = running.url, running.process.pid

        def under_way(job_id: str) -> bool:
            return bool(httpx.get(f"{url}/v1/jobs/{job_id}").json()["rows_done"] > 0)

        # A SIGTERM to the server's whole process group (systemd stops a service so) reaches
        # the pool too: its processes leave stopping to the server.
        first = submit_body(url, inputs / "huge.csv").json()["id"]
        wait_for(lambda: under_way(first), 60, "the first job under way")
        for child in pool_processes(pid):
            os.kill(child, signal.SIGTERM)
        done = wait_state(url, first, ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        # A pool process killed (the kernel's OOM killer does so) fails that job, clearly...
        second = submit_body(url, inputs / "huge.csv").json()["id"]
        wait_for(lambda: under_way(second), 60, "the second job under way")
        os.kill(pool_processes(pid)[0], signal.SIGKILL)
        failed = wait_state(url, second, ("succeeded", "failed"))
        assert failed["state"] == "failed", failed
        assert "a scoring process died" in failed["error"], failed
        # ...and only that job: the next one gets a new pool.
        third = submit_body(url, inputs / "iris.csv").json()["id"]
        done = wait_state(url, third, ("succeeded", "failed"))
        assert done["state"] == "succeeded", done
        result = httpx.get(f"{url}{done['result']}", timeout=60)
        assert result.content == expected["iris:2"]
        # A pool process killed between jobs: the next job gets a new pool, not a failure.
        os.kill(pool_processes(pid)[0], signal.SIGKILL)
        time.sleep(0.5)
        fourth = submit_body(url, inputs / "iris.csv").json()["id"]
        assert wait_state(url, fourth, ("succeeded", "failed"))["state"] == "succeeded"
        assert "Traceback" not in running.output()


def test_servers_of_other_repositories_never_run_a_job_and_keep_their_own_folders(
    trained_repository: Path, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    """Two servers of different repositories sharing one jobs folder: each job runs on a
    server of the repository it was submitted to (the other one's `iris` may be another
    model). By default they do not even share the folder."""
    other = tmp_path / "elsewhere" / "models"
    shutil.copytree(trained_repository, other)
    assert (
        Settings(model_repository=trained_repository).jobs_folder()
        != Settings(model_repository=other).jobs_folder()
    )
    env = jobs_env(tmp_path / "jobs", inputs)
    with (
        run_server(trained_repository, tmp_path, env=env) as mine,
        run_server(other, tmp_path, env=env) as theirs,
    ):
        ids = [submit_body(mine.url, inputs / "iris.csv").json()["id"] for _ in range(6)]
        for job_id in ids:
            done = wait_state(mine.url, job_id, ("succeeded", "failed"))
            assert done["state"] == "succeeded", done
            assert done["owner"].endswith(f":{mine.process.pid}"), (done, theirs.process.pid)
            assert "repository" not in done  # a server path, not part of the job's record
        result = httpx.get(f"{mine.url}/v1/jobs/{ids[-1]}/result", timeout=60)
        assert result.content == expected["iris:2"]


def test_two_server_workers_run_each_job_once(
    trained_repository: Path, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    env = jobs_env(tmp_path / "jobs", inputs)
    with run_server(trained_repository, tmp_path, env=env, args=("--workers", "2")) as running:
        wait_for(lambda: running.output().count("Application startup complete") >= 2)
        ids = [submit_body(running.url, inputs / "iris.csv").json()["id"] for _ in range(6)]
        for job_id in ids:
            done = wait_state(running.url, job_id, ("succeeded", "failed"))
            assert done["state"] == "succeeded", done
            assert done["attempts"] == 1, done
            result = httpx.get(f"{running.url}{done['result']}", timeout=60)
            assert result.content == expected["iris:2"]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_a_bad_row_fails_the_job_or_is_marked_by_on_error(
    jobs_server: RunningServer, tmp_path: Path, on_error: str
) -> None:
    # Several parts, scored at once: the bad row is in a later one.
    source = write_iris_csv(tmp_path / "bad.csv", ROWS)
    lines = source.read_text().splitlines()
    lines[20001] = lines[20001].replace(lines[20001].split(",")[1], "oops", 1)
    source.write_text("\n".join(lines) + "\n")
    job_id = submit_body(jobs_server.url, source, f"model=iris&on_error={on_error}").json()["id"]
    done = wait_state(jobs_server.url, job_id, ("succeeded", "failed"))
    if on_error == "fail":
        assert done["state"] == "failed"
        assert "row 20001" in done["error"], done["error"]
        assert "petal_width" in done["error"], done["error"]
        return
    assert done["state"] == "succeeded", done
    rows = httpx.get(f"{jobs_server.url}{done['result']}").text.splitlines()
    assert len(rows) == ROWS + 1
    assert "petal_width" in rows[20001]
    assert rows[20002].split(",")[0] == "0020001"


def test_a_file_whose_quoted_values_span_lines_is_scored_as_one_part(
    jobs_server: RunningServer, trained_repository: Path, tmp_path: Path
) -> None:
    """A value of 30,000 lines (bigger than a part) lies across a boundary between parts: a
    part finds it out, and the job is planned again as one part, read following the quotes."""
    source = write_iris_csv(tmp_path / "quoted.csv", ROWS)
    lines = source.read_text().splitlines()
    value = "\n".join(f"line {k}" for k in range(30_000))
    lines[15_001] = f'"{value}",' + lines[15_001].split(",", 1)[1]
    source.write_text("\n".join(lines) + "\n")
    job_id = submit_body(jobs_server.url, source, "model=iris&version=2").json()["id"]
    done = wait_state(jobs_server.url, job_id, ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["rows_done"] == ROWS
    result = httpx.get(f"{jobs_server.url}{done['result']}", timeout=60).content
    assert result == score_offline(trained_repository, "iris:2", source, tmp_path / "out.csv")
    quoted = pa_csv.ParseOptions(newlines_in_values=True)
    as_text = pa_csv.ConvertOptions(column_types={"id": pa.string()})
    table = pa_csv.read_csv(pa.py_buffer(result), parse_options=quoted, convert_options=as_text)
    ids = table["id"].to_pylist()
    assert ids[15_000] == value
    assert len(ids) == ROWS


def modelserve_jobs(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "jobs", "--url", url, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_the_cli_submits_waits_and_downloads_with_exit_codes_on_a_pipe(
    jobs_server: RunningServer, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    url = jobs_server.url
    submitted = modelserve_jobs(url, "submit", "iris", str(inputs / "iris.csv"))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert len(job_id) == 32  # nothing but the id on a pipe
    waited = modelserve_jobs(url, "wait", job_id)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout == "succeeded\n"
    assert waited.stderr == ""  # no progress bar off a terminal
    target = tmp_path / "scored.csv"
    target.write_bytes(expected["iris:2"][:1000])  # a download that stopped
    fetched = modelserve_jobs(url, "result", job_id, str(target), "--resume")
    assert fetched.returncode == 0, fetched.stderr
    assert target.read_bytes() == expected["iris:2"]
    again = modelserve_jobs(url, "result", job_id, str(target), "--resume")  # already whole
    assert (again.returncode, again.stderr) == (0, ""), again.stderr
    assert target.read_bytes() == expected["iris:2"]
    past = httpx.get(f"{url}/v1/jobs/{job_id}/result", headers={"Range": "bytes=99999999-"})
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{len(expected['iris:2'])}"
    listed = modelserve_jobs(url, "list", "--state", "succeeded")
    assert job_id in listed.stdout

    by_path = modelserve_jobs(url, "submit", "iris", "/etc/passwd", "--input-path")
    assert by_path.returncode == 1
    assert "outside the allowed roots" in by_path.stderr
    # Local files that are not there: one line each, no traceback.
    missing = modelserve_jobs(url, "submit", "iris", str(tmp_path / "nowhere.csv"))
    nowhere = modelserve_jobs(url, "result", job_id, str(tmp_path / "no" / "dir" / "x.csv"))
    for refused, path in ((missing, "nowhere.csv"), (nowhere, "x.csv")):
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: "), refused.stderr
        assert path in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("id,petal_width,sepal_length,petal_length,sepal_width\n1,x,1,1,1\n")
    failing = modelserve_jobs(url, "submit", "iris", str(bad)).stdout.strip()
    failed = modelserve_jobs(url, "wait", failing)
    assert failed.returncode == 1
    assert failed.stdout.startswith("failed: ")
    assert "petal_width" in failed.stdout


def test_an_input_the_runner_would_refuse_is_refused_at_submission(
    jobs_server: RunningServer, inputs: Path, tmp_path: Path
) -> None:
    """Missing feature columns, a column named twice, a file that is not Parquet: 400 while the
    client waits (as :score answers), not a job that fails later; an upload leaves no file."""
    url = jobs_server.url
    folder = Path(jobs_env_of(jobs_server))
    before = set(folder.iterdir())
    not_parquet = b"PAR1" + b"\x0e" * 300 + (200).to_bytes(4, "little") + b"PAR1"
    for body, media_type, reason in (
        (b"sepal_length,petal_width\n1,2\n", "text/csv", "missing feature columns"),
        (b"a,a\n1,2\n", "text/csv", "appears more than once"),
        (not_parquet, "application/vnd.apache.parquet", "not a readable Parquet file"),
    ):
        refused = httpx.post(
            f"{url}/v1/jobs?model=iris", content=body, headers={"Content-Type": media_type}
        )
        assert refused.status_code == 400, refused.text
        assert reason in refused.json()["error"], refused.text
    on_disk = tmp_path / "narrow.csv"
    on_disk.write_text("petal_width\n0.2\n")
    shutil.copy(on_disk, inputs / "narrow.csv")
    try:
        by_path = {"model": "iris", "input_path": str(inputs / "narrow.csv")}
        refused = httpx.post(f"{url}/v1/jobs", json=by_path)
        assert refused.status_code == 400, refused.text
        assert "missing feature columns" in refused.json()["error"]
    finally:
        (inputs / "narrow.csv").unlink()
    assert set(folder.iterdir()) == before  # no job, no file kept


def test_job_routes_go_through_the_request_boundary(
    trained_repository: Path, inputs: Path, tmp_path: Path
) -> None:
    env = jobs_env(tmp_path / "jobs", inputs, MODELSERVE_API_KEYS="jobs-key")
    with run_server(trained_repository, tmp_path, env=env) as running:
        for method, path in (("POST", "/v1/jobs?model=iris"), ("GET", "/v1/jobs")):
            refused = httpx.request(
                method, f"{running.url}{path}", content=b"a\n", headers={"X-Request-ID": "r1"}
            )
            assert refused.status_code == 401, refused.text
            assert "API key" in refused.json()["error"]
            assert refused.headers["x-request-id"] == "r1"
        key = {"X-API-Key": "jobs-key", "Content-Type": "text/csv"}
        body = (inputs / "iris.csv").read_bytes()
        accepted = httpx.post(f"{running.url}/v1/jobs?model=iris", content=body, headers=key)
        assert accepted.status_code == 202, accepted.text
        unknown = httpx.post(f"{running.url}/v1/jobs?model=nope", content=body, headers=key)
        assert unknown.status_code == 404
        assert "nope" in unknown.json()["error"]
        wrong = httpx.put(f"{running.url}/v1/jobs", headers=key)
        assert wrong.status_code == 405
        # A misspelt option is refused, not run with the default instead.
        misspelt = httpx.post(
            f"{running.url}/v1/jobs?model=iris&outptu_format=csv", content=body, headers=key
        )
        assert misspelt.status_code == 400
        assert "unknown field 'outptu_format' in the query" in misspelt.json()["error"]
        by_path = {"model": "iris", "input_path": str(inputs / "iris.csv"), "onerror": "skip"}
        api_key = {"X-API-Key": "jobs-key"}
        misspelt = httpx.post(f"{running.url}/v1/jobs", json=by_path, headers=api_key)
        assert misspelt.status_code == 400
        assert "unknown field 'onerror' in the JSON body" in misspelt.json()["error"]
        counted = scrape(running.url, key)
        labels = (("code", "202"), ("model", "iris"), ("protocol", "jobs"), ("version", "2"))
        assert counted[("modelserve_requests_total", labels)] == 1


@pytest.mark.parametrize(
    ("source_name", "output_format"),
    [("iris.csv", "ndjson"), ("iris.parquet", "parquet"), ("iris.parquet", "csv")],
)
def test_ndjson_and_parquet_jobs_equal_modelserve_score(
    jobs_server: RunningServer,
    trained_repository: Path,
    inputs: Path,
    tmp_path: Path,
    source_name: str,
    output_format: str,
) -> None:
    source = inputs / source_name
    if not source.exists():  # Parquet in several row groups, so that the job has several parts
        as_text = pa_csv.ConvertOptions(column_types={"id": pa.string()})
        table = pa_csv.read_csv(inputs / "iris.csv", convert_options=as_text)
        pq.write_table(table, source, row_group_size=4000)
    want = score_offline(trained_repository, "iris:2", source, tmp_path / f"want.{output_format}")
    fields = {"model": "iris", "input_path": str(source), "output_format": output_format}
    submitted = httpx.post(f"{jobs_server.url}/v1/jobs", json=fields)
    assert submitted.status_code == 202, submitted.text
    done = wait_state(jobs_server.url, submitted.json()["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done
    assert done["rows_total"] == ROWS
    got = httpx.get(f"{jobs_server.url}{done['result']}", timeout=60).content
    if output_format != "parquet":
        assert got == want
        return
    (tmp_path / "got.parquet").write_bytes(got)
    assert pq.read_table(tmp_path / "got.parquet").equals(pq.read_table(tmp_path / "want.parquet"))


def test_with_a_dask_scheduler_the_parts_run_on_its_workers(
    trained_repository: Path, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        env = jobs_env(
            tmp_path / "jobs", inputs, MODELSERVE_JOBS_DASK_SCHEDULER=cluster.scheduler_address
        )
        with run_server(trained_repository, tmp_path, env=env) as running:
            job_id = submit_body(running.url, inputs / "iris.csv").json()["id"]
            done = wait_state(running.url, job_id, ("succeeded", "failed"))
            assert done["state"] == "succeeded", done
            result = httpx.get(f"{running.url}{done['result']}", timeout=60)
            assert result.content == expected["iris:2"]
        # The parts ran on both workers, each of which loaded the model once.
        loads = client.run(_model_loads)
        assert len(loads) == 2
        assert all(misses == 1 for misses in loads.values()), loads


def _model_loads() -> int:
    from service.scoring import cached_model

    return int(cached_model.cache_info().misses)


def test_the_cli_waits_with_a_progress_bar_on_a_terminal(
    jobs_server: RunningServer, inputs: Path
) -> None:
    job_id = submit_body(jobs_server.url, inputs / "big.csv").json()["id"]
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "service", "jobs", "--url", jobs_server.url]
    command += ["wait", job_id, "--interval", "0.1"]
    process = subprocess.Popen(command, stderr=secondary, stdout=subprocess.DEVNULL)
    os.close(secondary)
    shown = b""
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the terminal closes when the process ends
            break
        if not data:
            break
        shown += data
    os.close(primary)
    assert process.wait(timeout=120) == 0
    text = shown.decode()
    assert "rows/s" in text
    assert "ETA" in text
    assert f"{BIG_ROWS:,} rows" in text


def test_a_jobs_folder_that_cannot_be_written_turns_jobs_off_not_the_server(
    trained_repository: Path, tmp_path: Path
) -> None:
    """As on a read-only root filesystem: inference serves, jobs answer 403 saying why."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {"MODELSERVE_JOBS_DIR": str(blocker / "jobs")}
    with run_server(trained_repository, tmp_path, env=env) as server:
        row = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
        assert httpx.post(f"{server.url}/v1/models/iris:predict", json=row).status_code == 200
        refused = httpx.get(f"{server.url}/v1/jobs")
        assert refused.status_code == 403
        assert "MODELSERVE_JOBS_DIR" in refused.json()["error"]
        assert "batch jobs are off" in server.output()


def test_job_processes_run_at_a_lower_priority_than_the_server(tmp_path: Path) -> None:
    pool = new_pool(Settings(model_repository=tmp_path, jobs_processes=1))
    try:
        assert pool.submit(os.nice, 0).result(timeout=60) == JOB_NICENESS
    finally:
        pool.shutdown()


def test_the_default_pool_has_a_process_per_core_the_server_may_use(tmp_path: Path) -> None:
    """In a container or under taskset the server may run on fewer cores than the machine has."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        pool = new_pool(Settings(model_repository=tmp_path, jobs_processes=0))
    finally:
        os.sched_setaffinity(0, allowed)
    try:
        assert isinstance(pool, ProcessPoolExecutor)
        assert vars(pool)["_max_workers"] == 1  # what it was made with; it starts them lazily
    finally:
        pool.shutdown()


@pytest.mark.parametrize("deleted", [False, True], ids=["cancelled", "deleted"])
def test_a_job_cancelled_while_it_starts_is_no_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, deleted: bool
) -> None:
    """DELETE may remove a job's input between the runner claiming the job and reading it:
    the job stays cancelled (or gone), and the server logs no failure and no traceback."""
    store = JobStore(tmp_path / "jobs")
    job_id = store.new_id()
    missing = store.job_folder(job_id) / "input.csv"
    job = Job(
        job_id, "queued", "iris", 2, str(missing), True, "csv", "csv", "fail", {}, 0,
        None, False, None, time.time(), None, None, None, None, 0,
    )  # fmt: skip
    store.add(job)
    claimed = store.claim("runner")
    assert claimed is not None
    assert store.cancel(job_id)
    if deleted:
        store.delete(job_id)
    settings = Settings(model_repository=tmp_path, jobs_processes=1)
    pool = new_pool(settings)
    try:
        with caplog.at_level(logging.INFO, logger="service.jobs.runner"):
            execute(store, settings, pool, claimed, "runner", threading.Event())
    finally:
        pool.shutdown()
    assert [r.levelno for r in caplog.records] == [logging.INFO], caplog.text
    assert ("deleted" if deleted else "cancelled") in caplog.text
    now = store.get(job_id)
    assert now is None if deleted else (now is not None and now.state == "cancelled"), now


def test_a_job_claimed_as_the_server_stops_is_handed_back_without_a_pool(
    trained_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker may claim a job just as the server begins to stop: it hands the job back at
    once, without starting a pool of processes for it (which, under load, held the stop up)."""
    stopping = threading.Event()

    class StopWhileClaiming(JobStore):
        def claim(self, owner: str) -> Job | None:
            job = super().claim(owner)
            stopping.set()  # SIGTERM arrives between the claim and the job's start
            return job

    store = StopWhileClaiming(tmp_path / "jobs")
    job_id = store.new_id()
    source = write_iris_csv(tmp_path / "in.csv", 100)
    job = Job(
        job_id, "queued", "iris", 2, str(source), False, "csv", "csv", "fail", {}, 0, None,
        False, None, time.time(), None, None, None, None, 0,
    )  # fmt: skip
    store.add(job)
    settings = Settings(model_repository=trained_repository, jobs_processes=1)
    children = set(multiprocessing.active_children())
    with caplog.at_level(logging.INFO, logger="service.jobs.runner"):
        asyncio.run(run_jobs(store, settings, stopping, lambda job, seconds: None))
    now = store.get(job_id)
    assert now is not None
    # Queued again, its claim not counted: the next server's attempt is its first.
    assert (now.state, now.owner, now.attempts) == ("queued", None, 0)
    assert "handed back to the queue" in caplog.text
    assert set(multiprocessing.active_children()) == children  # no pool was started


@pytest.mark.parametrize("victim", [0, 1])
def test_a_pool_whose_process_died_closes_whichever_process_died(
    tmp_path: Path, victim: int
) -> None:
    """One process scores, the other waits for work holding the task queue's lock. Either
    one killed, closing the broken pool ends (it once waited forever for the idle one)."""
    pool = new_pool(Settings(model_repository=tmp_path, jobs_processes=2))
    assert isinstance(pool, ProcessPoolExecutor)
    warm = [pool.submit(time.sleep, 0.5) for _ in range(2)]  # both processes started
    for future in warm:
        future.result(timeout=60)
    busy = pool.submit(sum, range(10**10))
    time.sleep(0.5)
    processes = sorted(pool._processes)
    assert len(processes) == 2
    os.kill(processes[victim], signal.SIGKILL)
    with pytest.raises(BrokenExecutor):
        busy.result(timeout=60)
    closing = threading.Thread(target=close_pool, args=(pool, True), daemon=True)
    closing.start()
    closing.join(timeout=20)
    assert not closing.is_alive(), "closing the broken pool did not end"
    assert not any(Path(f"/proc/{pid}").exists() for pid in processes)


def readme_commands(heading: str) -> list[list[str]]:
    """The commands of each `sh` block under the README's `### heading`, lines joined."""
    section = README.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    return [
        [c for c in block.replace("\\\n", " ").splitlines() if c and not c.startswith("#")]
        for block in blocks
    ]


def test_the_readmes_job_commands_run_as_written(
    jobs_server: RunningServer, inputs: Path, expected: dict[str, bytes], tmp_path: Path
) -> None:
    url = jobs_server.url
    curl, cli = readme_commands("Batch jobs")
    assert [c.split()[0] for c in curl] == ["curl"] * 6
    shutil.copy(inputs / "iris.csv", tmp_path / "rows.csv")
    # The README's /data is a folder under the server's allowed roots.
    as_text = pa_csv.ConvertOptions(column_types={"id": pa.string()})
    pq.write_table(
        pa_csv.read_csv(inputs / "iris.csv", convert_options=as_text), inputs / "rows.parquet"
    )

    def run(command: str, job_id: str = "") -> str:
        line = command.replace("localhost:8000", url.removeprefix("http://"))
        line = line.replace("/data/", f"{inputs}/")
        env = {**os.environ, "ID": job_id}
        done = subprocess.run(
            ["bash", "-c", line],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
            check=False,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        return done.stdout

    submitted = orjson.loads(run(curl[0]))
    assert submitted["state"] == "queued", submitted
    assert submitted["version"] == 2  # production
    by_path = orjson.loads(run(curl[1]))
    assert (by_path["on_error"], by_path["input_path"]) == ("skip", str(inputs / "rows.parquet"))
    status = orjson.loads(run(curl[2], submitted["id"]))
    shown = curl[2].split("#", 1)[1].split(",")  # the fields the README's comment names
    assert {name.strip() for name in shown} <= status.keys(), status
    assert status["id"] == submitted["id"]
    listed = orjson.loads(run(curl[3]))["jobs"]
    assert all(job["state"] == "running" for job in listed), listed
    for job in (submitted, by_path):
        assert wait_state(url, job["id"], ("succeeded", "failed"))["state"] == "succeeded"
    run(curl[4], submitted["id"])
    assert (tmp_path / "scored.csv").read_bytes() == expected["iris:2"]
    assert run(curl[5], submitted["id"]) == ""  # a finished job: deleted
    assert httpx.get(f"{url}/v1/jobs/{submitted['id']}").status_code == 404

    # The command line block, as one script that stops at the first command that fails.
    (tmp_path / "scored.csv").unlink()
    script = "\n".join(
        [
            "set -euo pipefail",
            *(c.replace("modelserve jobs ", f"modelserve jobs --url {url} ") for c in cli),
        ]
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    printed = done.stdout.splitlines()  # wait's state, any running jobs listed, cancel's word
    assert (printed[0], printed[-1]) == ("succeeded", "deleted"), done.stdout
    assert (tmp_path / "scored.csv").read_bytes() == expected["iris:2"]


def test_an_upload_that_stops_arriving_ends_with_408(
    trained_repository: Path, inputs: Path, tmp_path: Path
) -> None:
    """A job's input and a file to :score have no deadline (their length is the client's): a
    client that stops sending is ended after MODELSERVE_BODY_IDLE_TIMEOUT_S, not held forever."""
    env = jobs_env(tmp_path / "jobs", inputs, MODELSERVE_BODY_IDLE_TIMEOUT_S="1")
    with run_server(trained_repository, tmp_path, env=env) as running:
        parts = urlsplit(running.url)
        for path in ("/v1/jobs?model=iris", "/v1/models/iris:score"):
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/csv\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            ).encode()
            chunk = b"id,petal_width,sepal_length,petal_length,sepal_width\n"
            with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
                sock.sendall(head + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                started = time.monotonic()
                answer = b""
                while b"}" not in answer:
                    data = sock.recv(65536)
                    if not data:
                        break
                    answer += data
                took = time.monotonic() - started
            assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
            assert b"no part of the request body arrived for 1 s" in answer, answer
            assert took < 5, took
        assert httpx.get(f"{running.url}/v1/jobs").json()["jobs"] == []  # nothing half-kept
