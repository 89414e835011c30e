"""Bad input gets a 4xx JSON error naming the problem, never a 500, and the server keeps serving."""

from typing import Any

import httpx
import pytest

GOOD_ROW = [5.1, 3.5, 1.4, 0.2]


def v2(
    data: Any, shape: list[int] | None = None, name: str = "input", datatype: str = "FP32"
) -> dict[str, Any]:
    return {
        "inputs": [{"name": name, "shape": shape or [1, 4], "datatype": datatype, "data": data}]
    }


# (path, JSON body, expected status, a phrase the error message must contain)
CASES: list[tuple[str, Any, int, str]] = [
    ("/v2/models/iris/infer", v2([[1, 2, 3]], [1, 3]), 400, "4 features"),
    ("/v2/models/iris/infer", v2([[1, 2, 3, 4], [1, 2]], [2, 4]), 400, "ragged"),
    ("/v2/models/iris/infer", v2([[1, 2, "x", 4]]), 400, "numbers"),
    ("/v2/models/iris/infer", v2([[1, 2, None, 4]]), 400, "null"),
    ("/v2/models/iris/infer", v2([[True, False, True, False]]), 400, "booleans"),
    ("/v2/models/iris/infer", v2([[1, 2, 3, 4]], name="features"), 400, "unknown input 'features'"),
    ("/v2/models/iris/infer", v2([1, 2, 3, 4, 5, 6, 7, 8], [1, 4]), 400, "needs 4"),
    ("/v2/models/iris/infer", v2([], [0, 4]), 400, "empty batch"),
    ("/v2/models/iris/infer", v2([[1e39, 2, 3, 4]]), 400, "FP32 range"),
    ("/v2/models/iris/infer", v2([[1, 2, 3, 4]], datatype="FP99"), 400, "datatype"),
    ("/v2/models/iris/infer", {"inputs": []}, 400, "non-empty"),
    ("/v2/models/iris/infer", {"input": []}, 400, "unknown field 'input'"),
    ("/v2/models/iris/infer", [1, 2, 3], 400, "JSON object"),
    ("/v2/models/iris/infer", {**v2([GOOD_ROW]), "outputs": [{"name": "nope"}]}, 400, "no output"),
    (
        "/v2/models/iris/infer",
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]},
        400,
        "'data' is missing",
    ),
    (
        "/v2/models/iris/infer",
        {"inputs": [{"name": "input", "shape": [-1, 4], "datatype": "FP32", "data": [GOOD_ROW]}]},
        400,
        "shape",
    ),
    # Strings for a numeric input are refused naming the datatype the input takes.
    (
        "/v2/models/iris/infer",
        v2([["5.1", "3.5", "1.4", "0.2"]], datatype="BYTES"),
        400,
        "takes FP32",
    ),
    ("/v2/models/iris/infer", v2([["a", "b", "c", "d"]], datatype="BYTES"), 400, "takes FP32"),
    ("/v2/models/iris/infer", v2([[True, False, True, False]], datatype="BOOL"), 400, "takes FP32"),
    # A shape of another rank than the input's is refused, as Triton does.
    ("/v2/models/iris/infer", v2(GOOD_ROW, [4]), 400, "expected shape [-1, 4], got [4]"),
    ("/v2/models/iris/infer", v2([GOOD_ROW], [1, 1, 4]), 400, "expected shape [-1, 4]"),
    # Booleans among numbers are not numbers.
    ("/v2/models/iris/infer", v2([[True, 3.5, 1.4, 0.2]]), 400, "booleans"),
    ("/v2/models/iris/infer", v2([True, 3.5, 1.4, 0.2]), 400, "booleans"),
    ("/v2/models/iris/infer", v2([[5.1, 3.5, 1.4, False]], datatype="FP64"), 400, "booleans"),
    ("/v1/models/iris:predict", {"instances": [[True, 3.5, 1.4, 0.2]]}, 400, "booleans"),
    ("/v1/models/iris:predict", {"instances": [True, 3.5, 1.4, 0.2]}, 400, "booleans"),
    (
        "/v1/models/iris:predict",
        {
            "instances": [
                {"sepal_length": True, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
            ]
        },
        400,
        "booleans",
    ),
    # A declared row count over the limit is refused before the data is even looked at.
    ("/v2/models/iris/infer", v2([[1, 2], [3]], [2_000_000, 4]), 413, "limit of 1000000"),
    ("/v2/models/unknown/infer", v2([GOOD_ROW]), 404, "not in the repository"),
    ("/v2/models/iris/versions/9/infer", v2([GOOD_ROW]), 404, "no version 9"),
    ("/v2/models/iris/versions/01/infer", v2([GOOD_ROW]), 404, "no version '01'"),
    ("/v1/models/iris:predict", {"instances": [[1, 2, 3]]}, 400, "4 features"),
    ("/v1/models/iris:predict", {"instances": [{"sepal_length": 1}]}, 400, "missing feature"),
    (
        "/v1/models/iris:predict",
        {"instances": [[1, 2, 3, 4]], "extra": 1},
        400,
        "unknown field 'extra'",
    ),
    ("/v1/models/iris:predict", {"rows": [[1, 2, 3, 4]]}, 400, "unknown field 'rows'"),
    (
        "/v1/models/iris:predict",
        {"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]},
        400,
        'exactly one of "instances" or "inputs"',
    ),
    ("/v1/models/iris:predict", {"instances": []}, 400, "empty batch"),
    ("/v1/models/nope:predict", {"instances": [GOOD_ROW]}, 404, "not in the repository"),
]


@pytest.mark.parametrize(("path", "body", "status", "phrase"), CASES)
def test_bad_input_is_a_clear_client_error(
    client: httpx.Client, path: str, body: Any, status: int, phrase: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert phrase in error
    assert "Traceback" not in error
    # The service keeps serving good requests after every bad one.
    good = client.post("/v1/models/iris:predict", json={"instances": [GOOD_ROW]})
    assert good.json()["predictions"] == ["setosa"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "phrase"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"\xff\xfe\x00", "application/json", 400, "not valid UTF-8"),
        (b'{"instances": [[1,2,3,4]]}', "text/csv", 415, "content type 'text/csv'"),
    ],
)
def test_malformed_bodies(
    client: httpx.Client, content: bytes, content_type: str, status: int, phrase: str
) -> None:
    response = client.post(
        "/v1/models/iris:predict", content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == status
    assert phrase in response.json()["error"]


# Errors the framework raises rather than our code: (method, path, body, status, type, phrase).
FRAMEWORK_ERRORS: list[tuple[str, str, bytes | None, int, str, str]] = [
    ("GET", "/v2/nothing/here", None, 404, "RouteNotFound", "no endpoint at /v2/nothing/here"),
    ("GET", "/v3/models/iris", None, 404, "RouteNotFound", "/docs"),
    ("POST", "/v2/models/iris/generate", b"{}", 404, "RouteNotFound", "/v2/models/iris/generate"),
    # A V1 verb that is not served: a missing endpoint, not a model name the GET route takes.
    ("POST", "/v1/models/iris:explain", b"{}", 404, "RouteNotFound", "no endpoint :explain"),
    ("POST", "/v1/models/iris/versions/1:predictx", b"{}", 404, "RouteNotFound", ":predictx"),
    ("POST", "/v2/health/live", None, 405, "MethodNotAllowed", "POST is not allowed"),
    ("DELETE", "/v1/models/iris", None, 405, "MethodNotAllowed", "it answers GET"),
    ("GET", "/v2/models/iris/infer", None, 405, "MethodNotAllowed", "send POST"),
    ("POST", "/v2/repository/index", b"{not json", 400, "InvalidInput", "JSON"),
    ("POST", "/v2/repository/index", b'{"ready": "maybe"}', 400, "InvalidInput", "ready"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "kind", "phrase"), FRAMEWORK_ERRORS)
def test_framework_errors_have_the_error_shape(
    client: httpx.Client,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    kind: str,
    phrase: str,
) -> None:
    headers = {"Authorization": "Bearer test-admin-token", "Content-Type": "application/json"}
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()
    assert error["type"] == kind
    assert phrase in error["error"]
    if status == 405:
        assert response.headers["allow"] in error["error"]


def test_what_the_fast_path_passes_on_is_served_by_the_framework(client: httpx.Client) -> None:
    """The inference path wraps the FastAPI app: everything but inference POSTs reaches it."""
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert any(p.endswith("/infer") for p in paths)
    for method in ("HEAD", "OPTIONS", "PUT"):
        for path in ("/v2/models/iris/infer", "/v1/models/iris:predict", "/v1/models/iris:score"):
            response = client.request(method, path)
            assert response.status_code == 405, (method, path)
            assert response.headers["allow"] == "POST"
            if method != "HEAD":
                assert response.json()["error"] == f"{method} is not allowed here; send POST"
    assert client.get("/v2/health/ready").status_code == 200
    # Probes that check with HEAD get the GET's status and headers, without the body.
    for path in ("/", "/v2", "/v2/health/live", "/v2/health/ready"):
        checked = client.head(path)
        assert checked.status_code == 200, path
        assert checked.content == b""
        assert int(checked.headers["content-length"]) > 0
