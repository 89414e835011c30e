"""V1 (`instances`) prediction and model status against a real server process."""

from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris

from tests.reference import fitted_example
from tests.serving import RunningServer

IRIS = load_iris()
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_rows_as_lists(client: httpx.Client, trained_repository: Path, version: str) -> None:
    rows = IRIS.data[[0, 120]]
    response = client.post(
        f"/v1/models/iris/versions/{version}:predict", json={"instances": rows.tolist()}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"] == ["setosa", "virginica"]
    assert body["classes"] == ["setosa", "versicolor", "virginica"]
    want = fitted_example(trained_repository, "iris").predict_proba(rows)
    np.testing.assert_allclose(body["probabilities"], want, atol=1e-5)


def test_rows_as_objects_in_any_key_order(client: httpx.Client) -> None:
    row = dict(zip(FEATURES, IRIS.data[120].tolist(), strict=True))
    shuffled = dict(reversed(list(row.items())))
    response = client.post("/v1/models/iris:predict", json={"instances": [row, shuffled]})
    assert response.json()["predictions"] == ["virginica", "virginica"]


def test_inputs_key_is_accepted(client: httpx.Client) -> None:
    response = client.post("/v1/models/iris:predict", json={"inputs": [IRIS.data[0].tolist()]})
    assert response.json()["predictions"] == ["setosa"]


def test_one_flat_row_is_one_row(client: httpx.Client) -> None:
    """V1 has no declared shape: a flat list of one row's features is that row."""
    response = client.post("/v1/models/iris:predict", json={"instances": IRIS.data[120].tolist()})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == ["virginica"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_regressor_predictions_are_the_models_own(
    client: httpx.Client, trained_repository: Path, version: str
) -> None:
    rows = load_diabetes().data[:5]
    response = client.post(
        f"/v1/models/diabetes/versions/{version}:predict", json={"instances": rows.tolist()}
    )
    assert response.status_code == 200, response.text
    want = fitted_example(trained_repository, "diabetes").predict(rows)
    np.testing.assert_allclose(response.json()["predictions"], want, rtol=1e-5)
    assert "probabilities" not in response.json()


def test_model_status(client: httpx.Client) -> None:
    """KServe's V1 readiness (`name`, `ready`) and TF Serving's version statuses, in one body."""
    response = client.get("/v1/models/iris")
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["ready"]) == ("iris", True)
    status = body["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("1", "AVAILABLE"), ("2", "AVAILABLE")]
    for path in ("/v1/models/iris/versions/1", "/v1/models/iris/versions/stable"):
        one = client.get(path).json()
        assert (one["name"], one["ready"]) == ("iris", True)
        assert [s["version"] for s in one["model_version_status"]] == ["1"]
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/v1/models/iris/versions/9").status_code == 404


def test_status_of_a_model_that_is_not_ready(damaged_server: RunningServer) -> None:
    """503 (as KServe answers), with the statuses that say why and the error shape's keys."""
    response = httpx.get(f"{damaged_server.url}/v1/models/diabetes")
    assert response.status_code == 503
    body = response.json()
    assert (body["name"], body["ready"], body["type"]) == ("diabetes", False, "ModelNotReady")
    assert "diabetes" in body["error"]
    status = body["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("1", "END"), ("2", "END")]
    assert all("hash_mismatch" in s["status"]["error_message"] for s in status)


def test_status_of_a_version_that_is_not_ready(damaged_server: RunningServer) -> None:
    whole = httpx.get(f"{damaged_server.url}/v1/models/iris")
    assert whole.status_code == 200  # version 2, the default, serves
    assert whole.json()["ready"] is True
    states = [(s["version"], s["state"]) for s in whole.json()["model_version_status"]]
    assert states == [("1", "END"), ("2", "AVAILABLE")]
    for path in ("/v1/models/iris/versions/1", "/v1/models/iris/versions/stable"):
        response = httpx.get(f"{damaged_server.url}{path}")
        assert response.status_code == 503
        body = response.json()
        assert (body["name"], body["ready"]) == ("iris", False)
        assert "version 1" in body["error"]
        assert "hash_mismatch" in body["error"]
        assert [s["version"] for s in body["model_version_status"]] == ["1"]
