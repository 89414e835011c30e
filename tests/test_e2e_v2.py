"""V2 inference and metadata against a real server process, for joblib and ONNX versions alike."""

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris

from tests.reference import fitted_example

IRIS = load_iris()
PICKED = [0, 60, 120]
ROWS = IRIS.data[PICKED].astype(np.float32)
EXPECTED = [str(IRIS.target_names[t]) for t in IRIS.target[PICKED]]
VERSIONS = ["1", "2"]  # 1: joblib, 2: ONNX


def infer_body(rows: np.ndarray, datatype: str = "FP32", flat: bool = False) -> dict[str, Any]:
    data = rows.reshape(-1).tolist() if flat else rows.tolist()
    return {
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": datatype, "data": data}]
    }


def outputs_of(response: httpx.Response) -> dict[str, dict[str, Any]]:
    assert response.status_code == 200, response.text
    return {o["name"]: o for o in response.json()["outputs"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("flat", [False, True])
def test_iris_labels_and_probabilities(
    client: httpx.Client, trained_repository: Path, version: str, flat: bool
) -> None:
    response = client.post(
        f"/v2/models/iris/versions/{version}/infer", json=infer_body(ROWS, flat=flat)
    )
    outputs = outputs_of(response)
    assert response.json()["model_version"] == version
    assert outputs["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [3],
        "data": EXPECTED,
    }
    probabilities = outputs["probabilities"]
    assert (probabilities["datatype"], probabilities["shape"]) == ("FP32", [3, 3])
    matrix = np.array(probabilities["data"]).reshape(3, 3)
    want = fitted_example(trained_repository, "iris").predict_proba(ROWS)
    np.testing.assert_allclose(matrix, want, atol=1e-5)


def test_joblib_and_onnx_versions_agree(client: httpx.Client) -> None:
    bunch = load_breast_cancer()
    rows = bunch.data[::40].astype(np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }
    answers = [
        outputs_of(client.post(f"/v2/models/breast_cancer/versions/{v}/infer", json=body))
        for v in VERSIONS
    ]
    assert answers[0]["label"]["data"] == answers[1]["label"]["data"]
    for name in ("label", "probabilities"):
        assert answers[0][name]["datatype"] == answers[1][name]["datatype"]
        assert answers[0][name]["shape"] == answers[1][name]["shape"]
    np.testing.assert_allclose(
        answers[0]["probabilities"]["data"], answers[1]["probabilities"]["data"], atol=1e-5
    )


def test_default_version_comes_from_model_toml(client: httpx.Client) -> None:
    assert (
        client.post("/v2/models/iris/infer", json=infer_body(ROWS)).json()["model_version"] == "2"
    )


def test_alias_routes_to_its_version(client: httpx.Client) -> None:
    response = client.post("/v2/models/iris/versions/stable/infer", json=infer_body(ROWS))
    assert response.json()["model_version"] == "1"


@pytest.mark.parametrize("datatype", ["FP64", "INT64", "INT32"])
def test_other_numeric_datatypes_are_converted(client: httpx.Client, datatype: str) -> None:
    rows = np.array([[5, 3, 1, 0], [7, 3, 5, 2]])
    outputs = outputs_of(client.post("/v2/models/iris/infer", json=infer_body(rows, datatype)))
    assert outputs["label"]["data"] == ["setosa", "virginica"]


def test_id_is_echoed_and_outputs_select(client: httpx.Client) -> None:
    body = {**infer_body(ROWS), "id": "req-42", "outputs": [{"name": "probabilities"}]}
    response = client.post("/v2/models/iris/versions/1/infer", json=body)
    assert response.status_code == 200
    assert response.json()["id"] == "req-42"
    assert [o["name"] for o in response.json()["outputs"]] == ["probabilities"]


@pytest.mark.parametrize("version", VERSIONS)
def test_regressor_prediction(client: httpx.Client, trained_repository: Path, version: str) -> None:
    rows = load_diabetes().data[:5].astype(np.float32)
    outputs = outputs_of(
        client.post(f"/v2/models/diabetes/versions/{version}/infer", json=infer_body(rows))
    )
    assert outputs["prediction"]["datatype"] == "FP32"
    assert outputs["prediction"]["shape"] == [5]
    want = fitted_example(trained_repository, "diabetes").predict(rows)
    np.testing.assert_allclose(outputs["prediction"]["data"], want, rtol=1e-5)


def test_server_and_model_metadata(client: httpx.Client) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "modelserve"
    assert "binary_tensor_data" in server["extensions"]
    metadata = client.get("/v2/models/iris").json()
    assert metadata["versions"] == ["1", "2"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert metadata["parameters"]["classes"] == list(IRIS.target_names)
    joblib_metadata = client.get("/v2/models/iris/versions/1").json()
    assert joblib_metadata["platform"] == "sklearn"
    assert joblib_metadata["outputs"] == metadata["outputs"]


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/iris/ready").status_code == 200
    assert client.get("/v2/models/iris/versions/1/ready").status_code == 200
    assert client.get("/v2/models/iris/versions/9/ready").status_code == 404
    assert client.get("/v2/models/unknown/ready").status_code == 404


def test_binary_tensor_extension_both_ways(client: httpx.Client, trained_repository: Path) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [3, 4],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": ROWS.nbytes},
                }
            ],
            "outputs": [
                {"name": "probabilities", "parameters": {"binary_data": True}},
                {"name": "label"},
            ],
        }
    )
    response = client.post(
        "/v2/models/iris/versions/1/infer",
        content=header + ROWS.astype("<f4").tobytes(),
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    split = int(response.headers["inference-header-content-length"])
    meta = httpx.Response(200, content=response.content[:split]).json()
    probabilities, label = meta["outputs"]
    assert label["data"] == EXPECTED
    size = probabilities["parameters"]["binary_data_size"]
    values = np.frombuffer(response.content[split : split + size], dtype="<f4").reshape(3, 3)
    want = fitted_example(trained_repository, "iris").predict_proba(ROWS)
    np.testing.assert_allclose(values, want, atol=1e-5)
