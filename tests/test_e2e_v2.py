"""V2 inference against a real server process, for the joblib and the ONNX version alike."""

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_iris

IRIS = load_iris()
ROWS = IRIS.data[[0, 60, 120]].astype(np.float32)
EXPECTED = [str(IRIS.target_names[t]) for t in IRIS.target[[0, 60, 120]]]


def infer_body(rows: np.ndarray) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
        ]
    }


@pytest.mark.parametrize("version", ["1", "2"])
def test_iris_versions_agree_with_the_labels(client: httpx.Client, version: str) -> None:
    response = client.post(f"/v2/models/iris/versions/{version}/infer", json=infer_body(ROWS))
    assert response.status_code == 200, response.text
    body = response.json()
    outputs = {o["name"]: o for o in body["outputs"]}
    assert body["model_version"] == version
    assert outputs["label"]["datatype"] == "BYTES"
    assert outputs["label"]["data"] == EXPECTED
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
