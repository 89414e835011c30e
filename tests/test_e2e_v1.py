"""V1 (`instances`) prediction and model status against a real server process."""

from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_diabetes, load_iris

from tests.reference import fitted_example

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
    status = client.get("/v1/models/iris").json()["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("1", "AVAILABLE"), ("2", "AVAILABLE")]
    one = client.get("/v1/models/iris/versions/1").json()["model_version_status"]
    assert [s["version"] for s in one] == ["1"]
    assert client.get("/v1/models/nope").status_code == 404
