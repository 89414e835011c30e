"""`:score` against a real server: streamed CSV, NDJSON and Parquet, bad rows, bounded memory."""

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from sklearn.datasets import load_iris

from service.scoring import ModelReference, load_model
from tests.rawhttp import frame_chunks, request_head, send_until_answered
from tests.reference import fitted_example
from tests.scrape import scrape, total
from tests.serving import RunningServer, run_server

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSES = ["setosa", "versicolor", "virginica"]
CSV = "text/csv"
NDJSON = "application/x-ndjson"
PARQUET = "application/vnd.apache.parquet"


def iris_csv(rows: int = 150) -> tuple[bytes, np.ndarray]:
    """Iris rows as CSV with an id column first and the features in another order."""
    data = np.resize(load_iris().data, (rows, 4))
    lines = ["id,petal_width,sepal_length,petal_length,sepal_width"]
    lines += [f"{i:06d},{r[3]},{r[0]},{r[2]},{r[1]}" for i, r in enumerate(data.tolist())]
    return ("\n".join(lines) + "\n").encode(), data.astype(np.float32)


def changing_ids_csv(rows: int, switch: int) -> tuple[bytes, list[str]]:
    """Iris rows whose ids are numbers up to row `switch`, then `A<n>`: a CSV reader guessing
    types would give the id column one type in early chunks and another later."""
    data = np.resize(load_iris().data, (rows, 4)).tolist()
    ids = [f"A{i}" if i >= switch else str(i) for i in range(rows)]
    lines = ["id,sepal_length,sepal_width,petal_length,petal_width"]
    lines += [f"{i},{r[0]},{r[1]},{r[2]},{r[3]}" for i, r in zip(ids, data, strict=True)]
    return ("\n".join(lines) + "\n").encode(), ids


def expected(repository: Path, version: int, matrix: np.ndarray) -> dict[str, np.ndarray]:
    model = load_model(ModelReference(str(repository), "iris", version))
    return model.runtime.predict({"input": matrix}).outputs


def read_table(body: bytes, content_type: str) -> pa.Table:
    if content_type.startswith(CSV):
        return pa_csv.read_csv(
            io.BytesIO(body),
            convert_options=pa_csv.ConvertOptions(column_types={"id": pa.string()}),
        )
    if content_type.startswith(NDJSON):
        return pa.Table.from_pylist([orjson.loads(line) for line in body.splitlines()])
    return pq.read_table(io.BytesIO(body))


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("accept", [None, NDJSON, PARQUET])
def test_csv_rows_come_back_with_predictions_in_the_accepted_format(
    client: httpx.Client, trained_repository: Path, version: str, accept: str | None
) -> None:
    body, matrix = iris_csv(1000)
    headers = {"content-type": CSV, **({"accept": accept} if accept else {})}
    response = client.post(
        f"/v1/models/iris/versions/{version}:score?chunk_rows=300", content=body, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(accept or CSV)
    table = read_table(response.content, response.headers["content-type"])
    assert table.column_names[:5] == [
        "id",
        "petal_width",
        "sepal_length",
        "petal_length",
        "sepal_width",
    ]
    assert table.column_names[5:] == ["label", *(f"probability_{c}" for c in CLASSES)]
    # A CSV has no types: its cells come back as written, in every format.
    assert table["id"].to_pylist()[:3] == ["000000", "000001", "000002"]
    want = expected(trained_repository, int(version), matrix)
    assert table["label"].to_pylist() == [str(v) for v in want["label"]]
    got = np.column_stack([table[f"probability_{c}"].to_numpy() for c in CLASSES])
    np.testing.assert_allclose(got, want["probabilities"], rtol=1e-5, atol=1e-7)


def test_chunks_go_through_the_versions_batcher_and_are_counted(
    server: RunningServer, client: httpx.Client
) -> None:
    body, _ = iris_csv(1000)
    before = scrape(server.url)
    response = client.post(
        "/v1/models/iris/versions/2:score?chunk_rows=300",
        content=body,
        headers={"content-type": CSV},
    )
    assert response.status_code == 200, response.text
    after = scrape(server.url)
    iris = {"model": "iris", "version": "2"}

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **iris, **labels) - total(before, name, **iris, **labels)

    assert grew("modelserve_inference_rows_total") == 1000
    assert grew("modelserve_batch_rows_count") == 4  # chunks of 300, 300, 300 and 100 rows
    assert grew("modelserve_batch_rows_sum") == 1000
    assert grew("modelserve_requests_total", protocol="score", code="200") == 1


def test_ndjson_and_parquet_bodies_score_like_csv(
    client: httpx.Client, trained_repository: Path
) -> None:
    _, matrix = iris_csv(200)
    rows = [
        {"key": i, **dict(zip(FEATURES, r, strict=True))} for i, r in enumerate(matrix.tolist())
    ]
    ndjson = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink, row_group_size=64)
    want = [str(v) for v in expected(trained_repository, 2, matrix)["label"]]
    for body, content_type in ((ndjson, NDJSON), (sink.getvalue(), PARQUET)):
        response = client.post(
            "/v1/models/iris:score?chunk_rows=50",
            content=body,
            headers={"content-type": content_type},
        )
        assert response.status_code == 200, response.text
        table = read_table(response.content, content_type)
        assert table["key"].to_pylist() == list(range(200))
        assert table["label"].to_pylist() == want


def test_a_regressor_answers_with_a_prediction_column(
    client: httpx.Client, trained_repository: Path
) -> None:
    features = [0.01, 0.05, 0.06, 0.02, -0.04, -0.03, -0.04, 0.0, 0.02, -0.02]
    response = client.post(
        "/v1/models/diabetes:score",
        content=b"age,sex,bmi,bp,s1,s2,s3,s4,s5,s6\n" + ",".join(map(str, features)).encode(),
        headers={"content-type": CSV},
    )
    assert response.status_code == 200, response.text
    header, row = response.text.splitlines()
    assert header.endswith(",s6,prediction")
    want = fitted_example(trained_repository, "diabetes").predict([features])
    np.testing.assert_allclose(float(row.rsplit(",", 1)[1]), want[0], rtol=1e-5)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"id,sepal_length\n1,5.0\n", CSV, 400, "'sepal_width', 'petal_length', 'petal_width'"),
        (
            b"sepal_length,sepal_width,petal_length,petal_width\n5,3,1,x\n",
            CSV,
            400,
            "row 1, column 'petal_width': not a number: 'x'",
        ),
        (
            b"sepal_length,sepal_width,petal_length,petal_width\n5,3,1,1\n5,,1,1\n",
            CSV,
            400,
            "row 2, column 'sepal_width': missing value",
        ),
        (b'{"sepal_length": 5}\n', NDJSON, 400, "'sepal_width'"),
        (b"sepal_length,sepal_width,petal_length,petal_width\n", CSV, 400, "no rows"),
        (b"a,b\n1,2\n", "text/plain", 415, "text/csv"),
        (b"not parquet", PARQUET, 400, "Parquet"),
    ],
)
def test_bad_bodies_are_refused_before_any_output(
    client: httpx.Client, body: bytes, content_type: str, status: int, message: str
) -> None:
    response = client.post(
        "/v1/models/iris:score", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


def test_a_bad_row_after_the_first_chunk_ends_the_stream_with_an_error_line(
    client: httpx.Client,
) -> None:
    body, _ = iris_csv(100)
    lines = body.splitlines()
    lines[71] = b"000070,0.2,5.1,oops,3.5"
    response = client.post(
        "/v1/models/iris:score?chunk_rows=20",
        content=b"\n".join(lines) + b"\n",
        headers={"content-type": CSV},
    )
    assert response.status_code == 200
    out = response.text.splitlines()
    assert out[-1] == "#error: row 71, column 'petal_length': not a number: 'oops'"
    assert len(out) == 1 + 60 + 1  # header, the three chunks before the bad one, the error


def test_skipped_rows_carry_an_error_column(client: httpx.Client) -> None:
    body = b"sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n5,3,1,x\n6,3,6,2\n"
    response = client.post(
        "/v1/models/iris:score?on_error=skip",
        content=body,
        headers={"content-type": CSV, "accept": NDJSON},
    )
    assert response.status_code == 200, response.text
    rows = [orjson.loads(line) for line in response.content.splitlines()]
    assert [r["label"] for r in rows] == ["setosa", None, "virginica"]
    assert [r["error"] for r in rows] == [
        None,
        "row 2, column 'petal_width': not a number: 'x'",
        None,
    ]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_large_streamed_file_keeps_the_server_memory_bounded(
    trained_repository: Path, tmp_path: Path
) -> None:
    """160 MB of CSV from a client that reads nothing until it has sent it all.

    A server that kept the body (or the answer) in memory would keep growing as the file
    goes through; a bounded one reaches its working size early and stays there.
    """
    block, _ = iris_csv(20_000)
    header, rows = block.split(b"\n", 1)
    repeats = 160 * 2**20 // len(rows) + 1
    # Chunks are scored in worker threads, and glibc keeps freed memory per thread arena: two
    # arenas keep that small. Drift off: its window is memory that fills on the first rows.
    env = {"MODELSERVE_DRIFT_WINDOW_ROWS": "0", "MALLOC_ARENA_MAX": "2"}
    with run_server(trained_repository, tmp_path, env=env) as server:
        pid = server.process.pid
        url = f"{server.url}/v1/models/iris:score"
        httpx.post(url, content=block, headers={"content-type": CSV})
        idle = _rss_bytes(pid)
        samples: list[tuple[int, int]] = []  # (repeats sent, server RSS)

        def generate() -> Iterator[bytes]:
            yield header + b"\n"
            for sent in range(repeats):
                samples.append((sent, _rss_bytes(pid)))
                yield rows

        lines = 0
        with httpx.stream(
            "POST", url, content=generate(), headers={"content-type": CSV}, timeout=120
        ) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                lines += chunk.count(b"\n")
        samples.append((repeats, _rss_bytes(pid)))
    assert lines == 1 + repeats * 20_000
    quarter = next(rss for sent, rss in samples if sent >= repeats // 4)
    peak = max(rss for _, rss in samples)
    mb = 2**20
    # The last three quarters are 120 MB of CSV: a server that kept them, even unparsed, would
    # grow by more than this; allocator noise (up to 44 MB seen on a busy machine) stays under.
    assert peak - quarter < 64 * mb, f"grew {(peak - quarter) / mb:.0f} MB after a quarter"
    assert peak - idle < 150 * mb, f"grew {(peak - idle) / mb:.0f} MB above idle"


@pytest.mark.parametrize("accept", [NDJSON, PARQUET])
def test_csv_columns_keep_one_type_for_the_whole_answer(client: httpx.Client, accept: str) -> None:
    body, ids = changing_ids_csv(500, 340)
    response = client.post(
        "/v1/models/iris:score?chunk_rows=100",
        content=body,
        headers={"content-type": CSV, "accept": accept},
    )
    assert response.status_code == 200, response.text
    if accept == NDJSON:
        rows = [orjson.loads(line) for line in response.content.splitlines()]
        assert "error" not in rows[-1]
        assert [r["id"] for r in rows] == ids  # text, as sent, before and after the change
        assert {type(r[f]) for r in rows for f in FEATURES} == {float}
    else:
        table = pq.read_table(io.BytesIO(response.content))  # whole: its footer arrived
        assert table["id"].to_pylist() == ids
        assert table.schema.field("id").type == pa.string()
        assert {table.schema.field(f).type for f in FEATURES} == {pa.float64()}
        assert table.num_rows == 500


def test_declared_column_types_are_the_output_types(client: httpx.Client) -> None:
    body, _ = changing_ids_csv(300, 300)
    response = client.post(
        "/v1/models/iris:score?chunk_rows=100&column_types=id:int64,petal_width:string",
        content=body,
        headers={"content-type": CSV, "accept": PARQUET},
    )
    assert response.status_code == 200, response.text
    table = pq.read_table(io.BytesIO(response.content))
    assert table.schema.field("id").type == pa.int64()
    assert table["id"].to_pylist() == list(range(300))
    assert table.schema.field("petal_width").type == pa.string()  # declared wins
    assert table["label"].null_count == 0


@pytest.mark.parametrize(
    ("switch", "on_error"), [(40, "fail"), (340, "fail"), (340, "skip")], ids=str
)
def test_a_value_that_does_not_fit_its_declared_type_is_a_bad_row(
    client: httpx.Client, switch: int, on_error: str
) -> None:
    body, _ = changing_ids_csv(500, switch)
    response = client.post(
        f"/v1/models/iris:score?chunk_rows=100&column_types=id:int64&on_error={on_error}",
        content=body,
        headers={"content-type": CSV, "accept": NDJSON},
    )
    message = f"row {switch + 1}, column 'id': not a valid int64: 'A{switch}'"
    if on_error == "fail" and switch < 100:  # in the first chunk: before any output
        assert response.status_code == 400
        assert response.json() == {"error": message, "type": "InvalidInput"}
        return
    assert response.status_code == 200
    rows = [orjson.loads(line) for line in response.content.splitlines()]
    if on_error == "fail":  # the chunks before the bad one, then the error line
        assert rows[-1] == {"error": message, "type": "InvalidInput"}
        assert [r["id"] for r in rows[:-1]] == list(range(300))
        return
    assert [r["id"] for r in rows] == [*range(switch), *[None] * (500 - switch)]
    assert rows[switch]["error"] == message
    assert rows[switch]["label"] is None
    assert rows[switch - 1]["error"] is None
    assert rows[switch - 1]["label"] is not None


@pytest.mark.parametrize("accept", [CSV, NDJSON])
def test_a_bad_row_leaves_the_other_cells_of_its_chunk_as_they_were(
    client: httpx.Client, accept: str
) -> None:
    body, _ = changing_ids_csv(60, 60)
    lines = body.splitlines()
    lines[36] = b"35,5.1,3.5,oops,0.2"  # the second chunk of 20 rows
    lines[50] = b'"49, a quoted id",5.1,3.5,1.4,0.2'  # the third
    response = client.post(
        "/v1/models/iris:score?chunk_rows=20&on_error=skip",
        content=b"\n".join(lines) + b"\n",
        headers={"content-type": CSV, "accept": accept},
    )
    assert response.status_code == 200, response.text
    message = "row 36, column 'petal_length': not a number: 'oops'"
    out = response.content.splitlines()
    if accept == NDJSON:
        rows = [orjson.loads(line) for line in out]
        assert rows[35]["error"] == message
        assert rows[35]["petal_length"] is None
        assert {type(r["sepal_length"]) for r in rows} == {float}  # in every chunk
        assert rows[49]["id"] == "49, a quoted id"
        return
    # Every cell keeps the form it was sent in; only a cell that holds a comma or a quote
    # is quoted, in whichever chunk it is.
    predictions = b",label,probability_setosa,probability_versicolor,probability_virginica"
    assert out[0] == lines[0] + predictions + b",error"
    for sent, answer in zip(lines[1:], out[1:], strict=True):
        assert answer.startswith(sent + b","), answer
        assert b'"' not in answer.removeprefix(sent) or sent == lines[36]
    assert out[36] == lines[36] + b',,,,,"' + message.encode() + b'"'
    table = read_table(response.content, CSV)
    assert table["error"].to_pylist()[35] == message


def test_a_row_longer_than_the_limit_is_refused_as_it_arrives(server: RunningServer) -> None:
    """50 MB of one line: the server answers once a row passes the limit, without holding it."""
    pid = server.process.pid
    url = f"{server.url}/v1/models/iris:score"
    good = b"sepal_length,sepal_width,petal_length,petal_width\n5.1,3.5,1.4,0.2\n"
    assert httpx.post(url, content=good, headers={"content-type": CSV}).status_code == 200
    before = _rss_bytes(pid)

    def body() -> Iterator[bytes]:
        yield good + b"5.1,3.5,1.4,"
        for _ in range(800):
            yield b"1" * 65536

    head = request_head(
        "POST", "/v1/models/iris:score", {"Content-Type": CSV, "Transfer-Encoding": "chunked"}
    )
    answer, sent = send_until_answered(server.url, head, frame_chunks(body()))
    grown = _rss_bytes(pid) - before
    assert answer is not None
    assert answer.status == 400
    error = answer.json()
    assert isinstance(error, dict)
    assert error["error"].startswith(
        "row 2 is longer than 1048576 bytes, the limit of one row (MODELSERVE_MAX_ROW_BYTES)"
    )
    assert sent < 40 * 2**20  # answered while the body was still coming
    assert grown < 30 * 2**20, f"grew {grown / 2**20:.0f} MB"


def test_the_row_limit_is_a_setting(trained_repository: Path, tmp_path: Path) -> None:
    long_id = b"7" * 2_000_000
    with run_server(
        trained_repository, tmp_path, env={"MODELSERVE_MAX_ROW_BYTES": "3000000"}
    ) as server:
        url = f"{server.url}/v1/models/iris:score"
        header = b"id,sepal_length,sepal_width,petal_length,petal_width\n"
        rows = b"1,5.1,3.5,1.4,0.2\n" + long_id + b",5.1,3.5,1.4,0.2\n"
        response = httpx.post(url, content=header + rows, headers={"content-type": CSV})
        assert response.status_code == 200, response.text[:300]
        assert response.content.splitlines()[2].startswith(long_id + b",5.1,")
        too_long = header + rows + long_id * 2 + b",5.1,3.5,1.4,0.2\n"
        response = httpx.post(url, content=too_long, headers={"content-type": CSV})
        assert response.status_code == 400
        assert response.json()["error"].startswith("row 3 is longer than 3000000 bytes")
