"""The fault suite: bad input, limits, faulty models and overload against a real server process.

After every case the server must still be live and still give the right prediction.
"""

import concurrent.futures
import random
import string
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import ADMIN_TOKEN, API_KEY
from tests.models_for_faults import IRIS, POISON, fitted_with_gaps
from tests.rawhttp import chunked, exchange, request_head
from tests.serving import RunningServer, wait_for

ROWS = IRIS.data[[0, 60, 120]].astype(np.float32)
EXPECTED = [str(IRIS.target_names[t]) for t in IRIS.target[[0, 60, 120]]]
INFER = "/v2/models/iris/infer"
JOBS = "/v1/jobs"
JSON = {"Content-Type": "application/json"}
ADMIN_JSON = {**JSON, "Authorization": f"Bearer {ADMIN_TOKEN}"}
BINARY_HEADER = "Inference-Header-Content-Length"


def tensor(data: Any, shape: list[int], datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    return {"name": "input", "shape": shape, "datatype": datatype, "data": data, **extra}


def infer_body(rows: Any = None, **extra: Any) -> bytes:
    rows = ROWS.tolist() if rows is None else rows
    return orjson.dumps({"inputs": [tensor(rows, [len(rows), 4])], **extra})


def assert_serving(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    response = client.post(INFER, content=infer_body(), headers=JSON)
    assert response.status_code == 200, response.text
    labels = {o["name"]: o["data"] for o in response.json()["outputs"]}["label"]
    assert labels == EXPECTED


@pytest.fixture(autouse=True)
def still_serving(fault_client: httpx.Client) -> Iterator[None]:
    yield
    assert_serving(fault_client)


def binary_body(header: dict[str, Any], raw: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + raw, len(head)


def _binary_case(
    size: int, raw_rows: int, header_length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = np.zeros((raw_rows, 4), dtype=np.float32).tobytes()
    head = {"inputs": [tensor(None, [2, 4], parameters={"binary_data_size": size})]}
    del head["inputs"][0]["data"]
    body, length = binary_body(head, raw)
    headers = {
        "Content-Type": "application/octet-stream",
        BINARY_HEADER: header_length or str(length),
    }
    return body, headers


DEEP = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_NUMBER = b"1" * 5000
TOO_MANY_ROWS = infer_body([[5.0, 3.0, 1.5, 0.2]] * 1001)
TOO_LARGE = infer_body([[5.0, 3.0, 1.5, 0.2]] * 900, id="x" * 1_000_000)

# (case id, path, body, extra headers, expected status, a phrase the error message must contain)
CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed-json", INFER, b'{"inputs": [', JSON, 400, "not valid JSON"),
    ("not-utf8", INFER, b'{"inputs": "\xff\xfe\xfd"}', JSON, 400, "not valid UTF-8"),
    (
        "text-plain",
        INFER,
        infer_body(),
        {"Content-Type": "text/plain"},
        415,
        "content type 'text/plain'",
    ),
    (
        "form-urlencoded",
        INFER,
        infer_body(),
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "content type 'application/x-www-form-urlencoded'",
    ),
    (
        "octet-stream-to-v1",  # V1 has no binary extension
        "/v1/models/iris:predict",
        b"\xff\xfe",
        {"Content-Type": "application/octet-stream"},
        415,
        "content type 'application/octet-stream' is not accepted here; send application/json;",
    ),
    (
        "same-output-twice",
        INFER,
        infer_body(outputs=[{"name": "label"}, {"name": "label"}]),
        JSON,
        400,
        "output 'label' is asked for twice",
    ),
    ("top-level-array", INFER, b"[1, 2, 3]", JSON, 400, "must be a JSON object"),
    ("top-level-string", INFER, b'"inputs"', JSON, 400, "must be a JSON object"),
    ("top-level-null", INFER, b"null", JSON, 400, "must be a JSON object"),
    ("empty-body", INFER, b"", JSON, 400, "empty document"),
    (
        "unknown-request-field",
        INFER,
        infer_body(extra_field=1),
        JSON,
        400,
        "unknown field 'extra_field'",
    ),
    (
        "unknown-tensor-field",
        INFER,
        orjson.dumps({"inputs": [tensor([[1, 2, 3, 4]], [1, 4], colour="red")]}),
        JSON,
        400,
        "unknown field 'colour'",
    ),
    ("strings-as-features", INFER, infer_body([["a", "b", "c", "d"]]), JSON, 400, "found strings"),
    ("null-as-feature", INFER, infer_body([[5.1, None, 1.4, 0.2]]), JSON, 400, "null values"),
    (
        "booleans-as-features",
        INFER,
        infer_body([[True, False, True, False]]),
        JSON,
        400,
        "got booleans",
    ),
    (
        "infinity-token",
        INFER,
        b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[[Infinity,1,1,1]]}]}',
        JSON,
        400,
        "not valid JSON",
    ),
    (
        "nan-token",
        INFER,
        b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[[NaN,1,1,1]]}]}',
        JSON,
        400,
        "not valid JSON",
    ),
    ("1e39-into-fp32", INFER, infer_body([[1e39, 1.0, 1.0, 1.0]]), JSON, 400, "out of FP32 range"),
    # Values of a declared integer datatype must fit it (they were taken as sent).
    (
        "1000-declared-int8",
        INFER,
        orjson.dumps({"inputs": [tensor([[1000, 1, 1, 1]], [1, 4], "INT8")]}),
        JSON,
        400,
        "1000 is out of the range of INT8 (-128 to 127)",
    ),
    (
        "minus-1-declared-uint8",
        INFER,
        orjson.dumps({"inputs": [tensor([[-1, 1, 1, 1]], [1, 4], "UINT8")]}),
        JSON,
        400,
        "-1 is out of the range of UINT8",
    ),
    (
        "23-digits-declared-int64",
        INFER,
        b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"INT64","data":[[1,1,1,'
        + b"9" * 23
        + b"]]}]}",
        JSON,
        400,
        "out of the range of INT64",
    ),
    (
        "fraction-declared-int32",
        INFER,
        orjson.dumps({"inputs": [tensor([[1.5, 1, 1, 1]], [1, 4], "INT32")]}),
        JSON,
        400,
        "datatype INT32 takes integers",
    ),
    (
        "5000-digit-number",
        INFER,
        b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[['
        + HUGE_NUMBER
        + b",1,1,1]]}]}",
        JSON,
        400,
        "number is infinity",
    ),
    (
        "ragged-rows",
        INFER,
        orjson.dumps({"inputs": [tensor([[1, 2, 3, 4], [1, 2]], [2, 4])]}),
        JSON,
        400,
        "ragged",
    ),
    (
        "empty-batch",
        INFER,
        orjson.dumps({"inputs": [tensor([], [0, 4])]}),
        JSON,
        400,
        "empty batch",
    ),
    # A job named by JSON (input_path) is refused as clearly as an inference request.
    ("jobs-malformed-json", JOBS, b'{"model": "iris"', JSON, 400, "not valid JSON"),
    ("jobs-number-out-of-range", JOBS, b"1e400", JSON, 400, "not valid JSON"),
    ("jobs-deep-nesting", JOBS, b"[" * 100_000, JSON, 400, "not valid JSON"),
    ("jobs-version-object", JOBS, b'{"model": "iris", "version": {}}', JSON, 400, "version must"),
    ("too-many-rows", INFER, TOO_MANY_ROWS, JSON, 413, "1001 rows is more than the limit of 1000"),
    ("too-large-with-content-length", INFER, TOO_LARGE, JSON, 413, "over the limit of 1000000"),
    ("100000-deep-nesting", INFER, DEEP, JSON, 400, "nested more than 512 levels"),
    (
        "wrong-feature-count",
        INFER,
        infer_body([[1.0, 2.0, 3.0]]),
        JSON,
        400,
        "has 3 values but shape [1, 4] needs 4",
    ),
    (
        "shape-disagrees-with-data",
        INFER,
        orjson.dumps({"inputs": [tensor([[1, 2, 3, 4]], [2, 4])]}),
        JSON,
        400,
        "has 4 values but shape [2, 4] needs 8",
    ),
    (
        "negative-shape",
        INFER,
        orjson.dumps({"inputs": [tensor([[1, 2, 3, 4]], [-1, 4])]}),
        JSON,
        400,
        "'shape' must be a list of non-negative integers",
    ),
    (
        "unknown-datatype",
        INFER,
        orjson.dumps({"inputs": [tensor([[1, 2, 3, 4]], [1, 4], "FP128")]}),
        JSON,
        400,
        "'datatype' must be one of",
    ),
    ("missing-inputs", INFER, b'{"id": "1"}', JSON, 400, "'inputs' must be a non-empty list"),
    ("empty-inputs", INFER, b'{"inputs": []}', JSON, 400, "'inputs' must be a non-empty list"),
    (
        "unknown-input-name",
        INFER,
        orjson.dumps({"inputs": [{**tensor([[1, 2, 3, 4]], [1, 4]), "name": "x"}]}),
        JSON,
        400,
        "unknown input 'x'",
    ),
    (
        "input-twice",
        INFER,
        orjson.dumps({"inputs": [tensor([[1, 2, 3, 4]], [1, 4])] * 2}),
        JSON,
        400,
        "given twice",
    ),
    ("id-not-a-string", INFER, infer_body(id=7), JSON, 400, "'id' must be a string"),
    (
        "unknown-output",
        INFER,
        infer_body(outputs=[{"name": "nope"}]),
        JSON,
        400,
        "no output 'nope'",
    ),
    (
        "timeout-not-a-number",
        INFER,
        infer_body(parameters={"timeout": "soon"}),
        JSON,
        400,
        "parameters.timeout",
    ),
    (
        "unknown-model",
        "/v2/models/no-such-model/infer",
        infer_body(),
        JSON,
        404,
        "model 'no-such-model' is not in the repository",
    ),
    (
        "unknown-version",
        "/v2/models/iris/versions/99/infer",
        infer_body(),
        JSON,
        404,
        "model 'iris' has no version 99",
    ),
    (
        "version-leading-zero",
        "/v2/models/iris/versions/01/infer",
        infer_body(),
        JSON,
        404,
        "has no version '01'",
    ),
    (
        "version-negative",
        "/v2/models/iris/versions/-1/infer",
        infer_body(),
        JSON,
        404,
        "has no version '-1'",
    ),
    (
        "binary-header-length-past-body",
        INFER,
        *_binary_case(32, 2, header_length="99999"),
        400,
        "Inference-Header-Content-Length 99999 is outside the body",
    ),
    (
        "binary-header-length-not-a-number",
        INFER,
        *_binary_case(32, 2, header_length="ten"),
        400,
        "Inference-Header-Content-Length must be an integer",
    ),
    (
        "binary-header-length-negative",
        INFER,
        *_binary_case(32, 2, header_length="-5"),
        400,
        "Inference-Header-Content-Length -5 is outside the body",
    ),
    (
        "binary-data-size-past-body",
        INFER,
        *_binary_case(64, 1),
        400,
        "binary_data_size 64 runs past the end",
    ),
    (
        "binary-data-size-wrong-for-shape",
        INFER,
        *_binary_case(16, 2),
        400,
        "binary_data_size 16 does not match shape [2, 4]",
    ),
    ("binary-bytes-left-over", INFER, *_binary_case(32, 3), 400, "not claimed by any input"),
    (
        "v1-top-level-array",
        "/v1/models/iris:predict",
        b"[[5.1, 3.5, 1.4, 0.2]]",
        JSON,
        400,
        "must be a JSON object",
    ),
    (
        "v1-instances-not-a-list",
        "/v1/models/iris:predict",
        b'{"instances": 5}',
        JSON,
        400,
        '"instances" must be a list',
    ),
    (
        "v1-unknown-feature",
        "/v1/models/iris:predict",
        b'{"instances": [{"sepal_length": 1, "colour": 2}]}',
        JSON,
        400,
        "missing feature 'sepal_width'",
    ),
    (
        "v1-unknown-model",
        "/v1/models/nope:predict",
        b'{"instances": [[1, 2, 3, 4]]}',
        JSON,
        404,
        "model 'nope' is not in the repository",
    ),
    (
        "admin-deep-nesting",
        "/v2/repository/index",
        DEEP,
        ADMIN_JSON,
        400,
        "nested more than 512 levels",
    ),
    (
        "admin-malformed-json",
        "/v2/repository/index",
        b'{"ready": ',
        ADMIN_JSON,
        400,
        "JSON decode error",
    ),
    (
        "admin-top-level-array",
        "/v2/repository/index",
        b"[true]",
        ADMIN_JSON,
        400,
        "valid dictionary",
    ),
]


# Cases whose message does not name the cause yet.
UNNAMED_CAUSE: set[str] = set()


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "phrase"),
    [
        pytest.param(
            *case[1:],
            id=case[0],
            marks=[pytest.mark.xfail(strict=True, reason="the message does not name the cause")]
            if case[0] in UNNAMED_CAUSE
            else [],
        )
        for case in CASES
    ],
)
def test_bad_request_gets_a_clear_error(
    fault_client: httpx.Client,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    phrase: str,
) -> None:
    response = fault_client.post(path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]
    assert "Traceback" not in response.text


def _huge_chunked(fault_server: RunningServer, path: str, headers: dict[str, str]) -> int | None:
    body = b'{"inputs": "' + b"x" * 3_000_000 + b'"}'
    head = request_head(
        "POST",
        path,
        {**headers, "Transfer-Encoding": "chunked", "Content-Type": "application/json"},
    )
    answer = exchange(fault_server.url, head, chunked(body))
    return None if answer is None else answer.status


def test_chunked_body_over_the_limit_is_refused(fault_server: RunningServer) -> None:
    assert _huge_chunked(fault_server, INFER, {"X-API-Key": API_KEY}) == 413


def test_chunked_body_over_the_limit_is_refused_on_the_control_plane(
    fault_server: RunningServer,
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert _huge_chunked(fault_server, "/v2/repository/index", headers) == 413


def test_declared_length_over_the_limit_is_refused_before_reading(
    fault_server: RunningServer,
) -> None:
    # Only the head is sent: the answer cannot depend on reading the 50 MB body.
    head = request_head(
        "POST",
        "/v2/repository/index",
        {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        length=50_000_000,
    )
    answer = exchange(fault_server.url, head)
    assert answer is not None
    assert answer.status == 413


def test_content_length_shorter_than_the_body(fault_server: RunningServer) -> None:
    body = infer_body()
    head = request_head("POST", INFER, {"X-API-Key": API_KEY, **JSON}, length=len(body) // 2)
    answer = exchange(fault_server.url, head, (body,))
    assert answer is not None
    assert answer.status == 400


def test_content_length_longer_than_the_body_meets_the_deadline(
    fault_server: RunningServer,
) -> None:
    body = infer_body()
    head = request_head("POST", INFER, {"X-API-Key": API_KEY, **JSON}, length=len(body) + 100)
    answer = exchange(fault_server.url, head, (body,))
    assert answer is not None
    assert answer.status == 504
    assert "deadline" in orjson.loads(answer.body)["error"]


@pytest.mark.parametrize("admin", [True, False], ids=["admin", "no-credentials"])
def test_a_control_plane_body_that_stops_arriving_ends_with_408(
    fault_server: RunningServer, admin: bool
) -> None:
    """No deadline covers the routes the framework serves: a body that stops arriving is ended
    after MODELSERVE_BODY_IDLE_TIMEOUT_S (2 s here), not held with its connection forever."""
    request_id = f"stalled-body-{admin}"
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id}
    if admin:
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    head = request_head("PUT", "/v2/repository/models/iris/routing", headers, length=100)
    started = time.monotonic()
    answer = exchange(fault_server.url, head, (b'{"default_version"',), timeout=20)
    took = time.monotonic() - started
    assert answer is not None
    assert answer.status == 408, answer
    assert "no part of the request body arrived for 2 s" in orjson.loads(answer.body)["error"]
    assert 1.5 < took < 8, took

    def logged() -> list[str]:
        return [x for x in fault_server.output().splitlines() if f"request_id={request_id}" in x]

    wait_for(lambda: bool(logged()), 10, "its access line")
    assert "status=408" in logged()[0], logged()
    assert "error=BodyTimeout" in logged()[0], logged()


def test_client_that_leaves_mid_body(fault_server: RunningServer) -> None:
    body = infer_body()
    headers = {"X-API-Key": API_KEY, "X-Request-ID": "left-mid-body", **JSON}
    head = request_head("POST", INFER, headers, length=len(body) + 100)
    answer = exchange(fault_server.url, head, (body,), half_close=True)
    # Nobody is left to read an answer; what matters is that the server carries on (checked
    # after every case), and counts the request as the client's leaving (499, as proxies do),
    # not among the invalid requests (400).
    assert answer is None or answer.status == 499
    wait_for(lambda: "request_id=left-mid-body" in fault_server.output(), 10, "its access line")
    line = next(x for x in fault_server.output().splitlines() if "request_id=left-mid-body" in x)
    assert "status=499" in line, line
    assert "error=ClientLeft" in line, line


def test_failing_model_answers_500_with_the_request_id(fault_client: httpx.Client) -> None:
    rows = [[5.1, 3.5, POISON, 0.2]]
    response = fault_client.post(
        "/v2/models/failing/infer",
        content=infer_body(rows),
        headers={**JSON, "X-Request-ID": "fault-42"},
    )
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "the model failed: ValueError"  # the class only, not the message
    assert body["request_id"] == "fault-42"
    assert response.headers["x-request-id"] == "fault-42"
    assert "Traceback" not in response.text
    assert "line " not in response.text
    # The same model still serves other inputs.
    fine = fault_client.post("/v2/models/failing/infer", content=infer_body(), headers=JSON)
    assert fine.status_code == 200


def test_non_finite_predictions_are_strict_json(fault_client: httpx.Client) -> None:
    rows = [[1, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0], [4, 1, 1, 1]]
    v2 = fault_client.post("/v2/models/nonfinite/infer", content=infer_body(rows), headers=JSON)
    v1 = fault_client.post("/v1/models/nonfinite:predict", json={"instances": rows})
    for response in (v2, v1):
        assert response.status_code == 200, response.text
        for token in (b"NaN", b"Infinity"):
            assert token not in response.content
    assert v2.json()["outputs"][0]["data"] == [None, None, None, 7.0]
    assert v1.json()["predictions"] == [None, None, None, 7.0]


def test_a_model_that_takes_missing_values_takes_json_nulls(fault_client: httpx.Client) -> None:
    """JSON has no NaN: for a model packaged with allow_nan, null is a missing value (V2 and
    V1, rows as lists or objects); for any other model it stays a 400."""
    rows: list[list[float | None]] = [[5.1, None, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    features = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    expected = fitted_with_gaps().predict(np.array(rows, dtype=np.float64).astype(np.float32))
    v2 = fault_client.post("/v2/models/gaps/infer", content=infer_body(rows), headers=JSON)
    listed = fault_client.post("/v1/models/gaps:predict", json={"instances": rows})
    keyed = [dict(zip(features, row, strict=True)) for row in rows]
    named = fault_client.post("/v1/models/gaps:predict", json={"instances": keyed})
    assert v2.status_code == 200, v2.text
    labels = {o["name"]: o["data"] for o in v2.json()["outputs"]}["label"]
    assert labels == expected.tolist()
    for response in (listed, named):
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == expected.tolist()
    # Not for a model without allow_nan, nor as a value of an integer datatype.
    iris = fault_client.post(INFER, content=infer_body(rows), headers=JSON)
    assert iris.status_code == 400
    assert "null values" in iris.json()["error"]
    as_int = orjson.dumps({"inputs": [tensor([[5, None, 1, 0]], [1, 4], "INT32")]})
    refused = fault_client.post("/v2/models/gaps/infer", content=as_int, headers=JSON)
    assert refused.status_code == 400
    assert "null values" in refused.json()["error"]


@pytest.mark.parametrize("model", ["slow", "slow_alone"], ids=["batched", "unbatched"])
def test_overload_refuses_the_excess_and_serves_the_rest(
    fault_client: httpx.Client, model: str
) -> None:
    def call(_: int) -> httpx.Response:
        return fault_client.post(f"/v2/models/{model}/infer", content=infer_body(), headers=JSON)

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(call, range(16)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1, statuses
    assert statuses.count(200) >= 2, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"].isdigit()
        else:
            labels = {o["name"]: o["data"] for o in response.json()["outputs"]}["label"]
            assert labels == [0, 1, 2]


def test_per_request_deadline_gives_504(fault_client: httpx.Client) -> None:
    body = infer_body(parameters={"timeout": 100_000})  # microseconds, as tritonclient sends
    response = fault_client.post("/v2/models/slow/infer", content=body, headers=JSON)
    assert response.status_code == 504
    assert response.json()["type"] == "DeadlineExceeded"
    assert response.elapsed.total_seconds() < 0.45  # well before the model's answer


def test_random_model_names_do_not_grow_the_metrics(fault_client: httpx.Client) -> None:
    def series() -> int:
        text = fault_client.get("/metrics").text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    assert_serving(fault_client)
    before = series()
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + "_.-"
    for _ in range(1000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        path = f"/v2/models/{name}/infer" if rng.random() < 0.5 else f"/v2/models/{name}"
        response = (
            fault_client.post(path, content=infer_body(), headers=JSON)
            if "infer" in path
            else fault_client.get(path)
        )
        assert response.status_code < 500, (name, response.status_code)
    assert_serving(fault_client)
    assert series() == before


def test_tritonclient_timeout_is_the_request_deadline(fault_server: RunningServer) -> None:
    """tritonclient's `infer(timeout=)` (microseconds) reaches the server as the deadline."""
    client = triton.InferenceServerClient(url=fault_server.url.removeprefix("http://"))
    try:
        tensor = triton.InferInput("input", [3, 4], "FP32")
        tensor.set_data_from_numpy(ROWS)
        headers = {"X-API-Key": API_KEY}
        with pytest.raises(InferenceServerException) as refused:
            client.infer("slow", [tensor], timeout=100_000, headers=headers)
        assert refused.value.status() == "504"
        answered = client.infer("slow", [tensor], timeout=5_000_000, headers=headers)
        assert answered.as_numpy("label").tolist() == [0, 1, 2]
    finally:
        client.close()
