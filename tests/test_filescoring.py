"""`modelserve score` as a user runs it: a real process, real files, workers, a terminal."""

import io
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_iris

from service.errors import InvalidInput
from service.protocols.files import open_parquet
from service.scoring import ModelReference, score
from service.scoring.parts import ScoreFile, plan_parts, score_part

ROWS = 30_000


def run_score(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "service", "score", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def iris_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = np.resize(load_iris().data, (ROWS, 4))
    path = tmp_path_factory.mktemp("input") / "iris.csv"
    lines = ["id,petal_width,sepal_length,petal_length,sepal_width"]
    lines += [f"{i:06d},{r[3]},{r[0]},{r[2]},{r[1]}" for i, r in enumerate(data.tolist())]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_workers_score_a_csv_exactly_like_one_process_and_like_score(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    outputs = {}
    for workers in ("1", "2"):
        target = tmp_path / f"out-{workers}.csv"
        done = run_score(
            "iris:2", iris_csv, target, "--model-repository", trained_repository,
            "--workers", workers, "--chunk-rows", "4000",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""  # no progress bar when stderr is not a terminal
        outputs[workers] = target.read_bytes()
    assert outputs["1"] == outputs["2"]
    as_text = pa_csv.ConvertOptions(column_types={"id": pa.string()})
    table = pa_csv.read_csv(iris_csv, convert_options=as_text)
    want = score(table, ModelReference(str(trained_repository), "iris", 2))
    got = pa_csv.read_csv(tmp_path / "out-2.csv", convert_options=as_text)
    assert got.num_rows == ROWS
    assert got.column_names == want.column_names
    assert got["id"].to_pylist()[:2] == ["000000", "000001"]  # cells come back as written
    assert got["label"].to_pylist() == want["label"].to_pylist()
    np.testing.assert_allclose(
        got["probability_virginica"].to_numpy(), want["probability_virginica"].to_numpy(), 1e-6
    )


def test_parquet_and_ndjson_round_trip_through_workers(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    table = pa_csv.read_csv(iris_csv).slice(0, 6000)
    source = tmp_path / "in.parquet"
    pq.write_table(table, source, row_group_size=1500)
    ndjson = tmp_path / "out.ndjson"
    scored = tmp_path / "out.parquet"
    repository = ("--model-repository", trained_repository)
    assert run_score("iris:1", source, ndjson, *repository, "--workers", "2").returncode == 0
    done = run_score("iris:1", ndjson, scored, *repository, "--workers", "2")
    assert done.returncode == 0, done.stderr
    result = pq.read_table(scored)
    want = score(table, ModelReference(str(trained_repository), "iris", 1))
    assert result["id"].to_pylist() == table["id"].to_pylist()
    assert result["label"].to_pylist() == want["label"].to_pylist()


def test_a_bad_row_in_a_later_part_fails_with_its_row_and_no_output(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    lines = iris_csv.read_bytes().splitlines()
    lines[25_001] = b"025000,0.2,5.1,,3.5"
    source = tmp_path / "bad.csv"
    source.write_bytes(b"\n".join(lines) + b"\n")
    target = tmp_path / "out.csv"
    repository = ("--model-repository", trained_repository)
    done = run_score("iris", source, target, *repository, "--workers", "2")
    assert done.returncode == 1
    # On its own line only after a progress bar: here, none was drawn (not a terminal).
    assert done.stderr == "error: row 25001, column 'petal_length': missing value\n"
    assert not target.exists()
    done = run_score("iris", source, target, *repository, "--on-error", "skip", "--workers", "2")
    assert done.returncode == 0, done.stderr
    scored = pa_csv.read_csv(target)
    errors = scored["error"].to_pylist()
    assert errors[25_000] == "row 25001, column 'petal_length': missing value"
    assert sum(bool(e) for e in errors) == 1
    assert scored["label"].to_pylist().count("") == 1  # CSV writes a missing label empty
    assert scored["label"][25_000].as_py() == ""
    assert scored.num_rows == ROWS


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_planning_the_parts_does_not_read_the_file(
    trained_repository: Path, iris_csv: Path
) -> None:
    """Workers start at once: nothing reads the whole file before them, to count its rows."""
    job = ScoreFile(
        ModelReference(str(trained_repository), "iris"), iris_csv, iris_csv, "csv", "csv", workers=4
    )
    before = _bytes_read()
    parts = plan_parts(job)
    assert _bytes_read() - before < 64 * 1024 < iris_csv.stat().st_size // 10
    assert [part.first_row for part in parts] == [0, None, None, None]
    assert parts[0].start == iris_csv.read_bytes().index(b"\n") + 1
    assert parts[-1].stop == iris_csv.stat().st_size


def test_a_part_counts_the_rows_before_it_only_to_name_a_bad_row(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    lines = iris_csv.read_bytes().splitlines(keepends=True)
    lines[20_001] = b"020000,0.2,5.1,,3.5\n"
    source = tmp_path / "bad.csv"
    source.write_bytes(b"".join(lines))
    job = ScoreFile(
        ModelReference(str(trained_repository), "iris"), source, source, "csv", "csv",
        chunk_rows=4000, workers=2, on_error="skip",
    )  # fmt: skip
    last = plan_parts(job)[1]
    assert last.first_row is None
    reported = [0, 0]

    def report(rows: int, consumed: int) -> None:
        reported[0] += rows
        reported[1] += consumed

    rows = score_part(job, last, tmp_path / "part-1", report)
    first_row = sum(line.count(b"\n") for line in lines[1:]) - rows
    scored = pa_csv.read_csv(tmp_path / "part-1", read_options=pa_csv.ReadOptions(
        column_names=[*pa_csv.read_csv(iris_csv).column_names, "label", "p0", "p1", "p2", "error"]
    ))  # fmt: skip
    errors = [e for e in scored["error"].to_pylist() if e]
    assert errors == ["row 20001, column 'petal_length': missing value"]
    assert scored["id"][20_000 - first_row].as_py() == 20_000
    # Scored a second time once the error needed the row count; its progress counts once.
    assert reported == [rows, last.stop - last.start]


def test_the_score_command_imports_only_what_it_needs(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    """Start-up is part of every run: pandas (which pyarrow imports on its first conversion
    to look for pandas objects), the server and the job client's HTTP stack stay out."""
    program = f"""
import sys
import time
from service.cli import main
code = main(["score", "iris:2", {str(iris_csv)!r}, {str(tmp_path / "o.csv")!r},
             "--model-repository", {str(trained_repository)!r}, "--workers", "1"])
unneeded = ["pandas", "fastapi", "starlette", "uvicorn", "grpc", "prometheus_client",
            "urllib.request", "cryptography", "tomlkit", "sklearn"]
print(code, [name for name in unneeded if name in sys.modules])
import pandas  # still there for whoever needs it
print(pandas.DataFrame({{"a": [1]}}).shape)
"""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.splitlines() == ["0 []", "(1, 1)"], done.stderr


@pytest.mark.parametrize(
    ("model", "message"),
    [("iris:9", "model 'iris' has no version '9'"), ("nosuch", "model 'nosuch' is not in")],
)
def test_unknown_models_fail_with_a_clear_message(
    trained_repository: Path, iris_csv: Path, tmp_path: Path, model: str, message: str
) -> None:
    done = run_score(model, iris_csv, tmp_path / "o.csv", "--model-repository", trained_repository)
    assert done.returncode == 1
    assert message in done.stderr


def test_a_tampered_artifact_is_refused(repository: Path, iris_csv: Path, tmp_path: Path) -> None:
    artifact = repository / "iris" / "2" / "model.onnx"
    artifact.write_bytes(artifact.read_bytes()[:-10])
    done = run_score("iris:2", iris_csv, tmp_path / "o.csv", "--model-repository", repository)
    assert done.returncode == 1
    assert "sha256" in done.stderr


def test_a_terminal_gets_a_progress_bar(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    primary, secondary = pty.openpty()
    command = [sys.executable, "-m", "service", "score", "iris", str(iris_csv)]
    command += [str(tmp_path / "o.csv"), "--model-repository", str(trained_repository)]
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
    assert process.wait(timeout=60) == 0
    text = shown.decode()
    assert "rows/s" in text
    assert "ETA" in text
    assert f"scored {ROWS:,} rows" in text


def _changing_ids(path: Path, switch: int) -> list[str]:
    """ROWS iris rows whose ids are numbers up to row `switch`, then `A<n>`."""
    data = np.resize(load_iris().data, (ROWS, 4)).tolist()
    ids = [f"A{i}" if i >= switch else str(i) for i in range(ROWS)]
    lines = ["id,sepal_length,sepal_width,petal_length,petal_width"]
    lines += [f"{i},{r[0]},{r[1]},{r[2]},{r[3]}" for i, r in zip(ids, data, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return ids


def test_csv_columns_keep_one_type_unless_declared(
    trained_repository: Path, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    ids = _changing_ids(source, 25_000)
    target = tmp_path / "out.parquet"
    repository = ("--model-repository", trained_repository, "--chunk-rows", "4000")
    done = run_score("iris", source, target, *repository, "--workers", "2")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(target)
    assert table["id"].to_pylist() == ids  # text, as written, in every chunk and part
    assert table.schema.field("sepal_length").type == pa.float64()

    declared = ("--column-types", "id:int64")
    done = run_score("iris", source, target, *repository, *declared, "--workers", "2")
    assert done.returncode == 1
    assert done.stderr.strip() == "error: row 25001, column 'id': not a valid int64: 'A25000'"
    numbers = tmp_path / "numbers.csv"
    _changing_ids(numbers, ROWS)
    assert run_score("iris", numbers, target, *repository, *declared).returncode == 0
    assert pq.read_table(target).schema.field("id").type == pa.int64()


def test_column_types_that_do_not_parse_are_a_usage_error(
    trained_repository: Path, iris_csv: Path, tmp_path: Path
) -> None:
    target = tmp_path / "out.parquet"
    repository = ("--model-repository", trained_repository)
    done = run_score("iris", iris_csv, target, *repository, "--column-types", "id=int64")
    assert done.returncode == 2
    assert "'id=int64' is not NAME:TYPE" in done.stderr
    done = run_score("iris", iris_csv, target, *repository, "--column-types", "idd:int64")
    assert done.returncode == 1
    assert "column_types names 'idd', not a column of the input" in done.stderr


def test_a_row_longer_than_the_limit_fails_naming_it(
    trained_repository: Path, tmp_path: Path
) -> None:
    source = tmp_path / "long.csv"
    source.write_bytes(
        b"id,sepal_length,sepal_width,petal_length,petal_width\n1,5.1,3.5,1.4,0.2\n"
        + b"2" * 3_000_000
        + b",5.1,3.5,1.4,0.2\n3,5.1,3.5,1.4,0.2\n"
    )
    repository = ("--model-repository", trained_repository)
    done = run_score("iris", source, tmp_path / "out.csv", *repository, "--workers", "2")
    assert done.returncode == 1
    assert done.stderr.startswith(
        "error: row 2 is longer than 1048576 bytes, the limit of one row (MODELSERVE_MAX_ROW_BYTES)"
    )


def _quoted_csv(path: Path, value_lines: int) -> list[str]:
    """ROWS iris rows; row 15,000's id is a quoted value of `value_lines` lines (across the
    middle of the file, where it splits), row 100's a quoted one with a comma."""
    data = np.resize(load_iris().data, (ROWS, 4)).tolist()
    ids = [str(i) for i in range(ROWS)]
    ids[100] = "a, b"
    ids[15_000] = "\n".join(f"line {k}" for k in range(value_lines))
    lines = ["id,sepal_length,sepal_width,petal_length,petal_width"]
    cells = [f'"{i}"' if "," in i or "\n" in i else i for i in ids]
    lines += [f"{cell},{r[0]},{r[1]},{r[2]},{r[3]}" for cell, r in zip(cells, data, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return ids


@pytest.mark.parametrize("value_lines", [2, 3000])
def test_quoted_values_holding_newlines_are_rows_however_the_file_splits(
    trained_repository: Path, tmp_path: Path, value_lines: int
) -> None:
    """Lines are not rows here: a part finds out, and the file is read as one that follows
    the quotes, so every row comes back once, as with one worker."""
    source = tmp_path / "quoted.csv"
    ids = _quoted_csv(source, value_lines)
    outputs = {}
    for workers in ("1", "2"):
        target = tmp_path / f"out-{workers}.csv"
        done = run_score(
            "iris", source, target, "--model-repository", trained_repository,
            "--workers", workers, "--chunk-rows", "4000",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs[workers] = target.read_bytes()
    assert outputs["1"] == outputs["2"]
    quoted = pa_csv.ParseOptions(newlines_in_values=True)
    as_text = pa_csv.ConvertOptions(column_types={"id": pa.string()})
    scored = pa_csv.read_csv(tmp_path / "out-2.csv", parse_options=quoted, convert_options=as_text)
    assert scored["id"].to_pylist() == ids
    assert scored["label"].null_count == 0


def test_after_a_quoted_newline_errors_name_rows_not_lines(
    trained_repository: Path, tmp_path: Path
) -> None:
    source = tmp_path / "quoted.csv"
    _quoted_csv(source, 3000)
    lines = source.read_bytes().splitlines(keepends=True)
    lines[-10] = b"29990,5.1,x,1.4,0.2\n"  # row 29,991 on line 32,991 of the file
    source.write_bytes(b"".join(lines))
    done = run_score(
        "iris", source, tmp_path / "out.csv", "--model-repository", trained_repository,
        "--workers", "2",
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == "error: row 29991, column 'sepal_width': not a number: 'x'\n"


def test_a_quote_inside_a_value_that_is_not_quoted_stays_in_it(
    trained_repository: Path, tmp_path: Path
) -> None:
    source = tmp_path / "inches.csv"
    rows = ["id,sepal_length,sepal_width,petal_length,petal_width"]
    rows += [f"{i},5.1,3.5,1.4,0.2" for i in range(20_000)]
    rows[15_001] = "5'10\",5.1,3.5,1.4,0.2"
    source.write_text("\n".join(rows) + "\n")
    target = tmp_path / "out.csv"
    done = run_score(
        "iris", source, target, "--model-repository", trained_repository, "--workers", "2"
    )
    assert done.returncode == 0, done.stderr
    scored = pa_csv.read_csv(
        target, convert_options=pa_csv.ConvertOptions(column_types={"id": pa.string()})
    )
    assert scored.num_rows == 20_000
    assert scored["id"][15_000].as_py() == "5'10\""


def test_a_first_part_of_blank_lines_still_writes_the_header(
    trained_repository: Path, tmp_path: Path
) -> None:
    source = tmp_path / "blank.csv"
    header = "id,sepal_length,sepal_width,petal_length,petal_width\n"
    source.write_text(header + "\n" * 2000 + "1,5.1,3.5,1.4,0.2\n2,6.7,3.0,5.2,2.3\n")
    outputs = {}
    for workers in ("1", "3"):
        target = tmp_path / f"out-{workers}.csv"
        done = run_score(
            "iris", source, target, "--model-repository", trained_repository, "--workers", workers
        )
        assert done.returncode == 0, done.stderr
        outputs[workers] = target.read_text()
    assert outputs["3"] == outputs["1"]
    assert outputs["3"].splitlines()[0].startswith(header.strip() + ",label,")
    assert len(outputs["3"].splitlines()) == 3


@pytest.mark.parametrize(
    ("stop", "status", "said"),
    [(signal.SIGINT, 130, "modelserve: interrupted"), (signal.SIGTERM, 143, "")],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_run_leaves_no_output_no_parts_and_no_traceback(
    trained_repository: Path,
    iris_csv: Path,
    tmp_path: Path,
    stop: signal.Signals,
    status: int,
    said: str,
) -> None:
    big = tmp_path / "big.csv"
    header, _, rows = iris_csv.read_bytes().partition(b"\n")
    big.write_bytes(header + b"\n" + rows * 100)  # 3,000,000 rows: seconds of work
    out = tmp_path / "out" / "scored.csv"
    out.parent.mkdir()
    command = [sys.executable, "-m", "service", "score", "iris", str(big), str(out)]
    command += ["--model-repository", str(trained_repository), "--workers", "2"]
    # Its own process group, signalled whole, as a terminal's Ctrl-C is.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size for p in out.parent.glob(".score-*/part-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no part was written within 60 s"
        time.sleep(0.02)
    os.killpg(process.pid, stop)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == status, stderr
    assert b"Traceback" not in stdout + stderr, stderr.decode()
    assert said in stderr.decode()
    assert list(out.parent.iterdir()) == []  # neither the output nor the hidden parts folder
    assert group_gone(process.pid, 5)  # its workers are gone with it


def group_gone(group: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("seed", range(8))
def test_a_file_that_only_looks_like_parquet_gets_a_readable_reason(seed: int) -> None:
    """Parquet's magic bytes around junk: the reason names no byte of the junk."""
    junk = np.random.default_rng(seed).integers(0, 256, 400, dtype=np.uint8).tobytes()
    fake = b"PAR1" + junk + (300).to_bytes(4, "little") + b"PAR1"
    with pytest.raises(InvalidInput) as refused:
        open_parquet(io.BytesIO(fake))
    assert refused.value.message.startswith("not a readable Parquet file: ")
    assert refused.value.message.isprintable(), repr(refused.value.message)
