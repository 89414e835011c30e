"""The real tritonclient.http client works against modelserve unchanged."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_iris

from tests.reference import fitted_example
from tests.serving import RunningServer, run_server
from training.examples import IRIS_INTEGER, train_example

IRIS = load_iris()
ROWS = IRIS.data[[0, 60, 120]].astype(np.float32)
EXPECTED = [str(IRIS.target_names[t]) for t in IRIS.target[[0, 60, 120]]]


@pytest.fixture(scope="module")
def integer_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Iris trained on the dataset's integer targets: versions whose labels are INT64."""
    root = tmp_path_factory.mktemp("integer") / "models"
    train_example(IRIS_INTEGER, root)
    return root


@pytest.fixture(scope="module")
def integer_server(
    integer_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with run_server(integer_repository, tmp_path_factory.mktemp("integer-logs")) as running:
        yield running


@pytest.fixture
def triton_client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def test_health_calls(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("iris")
    assert triton_client.is_model_ready("iris", "1")
    assert not triton_client.is_model_ready("iris", "7")
    assert not triton_client.is_model_ready("no_such_model")


def test_model_metadata(triton_client: triton.InferenceServerClient) -> None:
    metadata = triton_client.get_model_metadata("iris", "1")
    assert metadata["name"] == "iris"
    assert metadata["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 4]}
    assert [o["name"] for o in metadata["outputs"]] == ["label", "probabilities"]
    assert triton_client.get_server_metadata()["name"] == "modelserve"


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("binary", [True, False])
def test_infer(
    triton_client: triton.InferenceServerClient,
    trained_repository: Path,
    version: str,
    binary: bool,
) -> None:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=binary),
        triton.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = triton_client.infer(
        "iris", [tensor], model_version=version, outputs=outputs, request_id="triton-1"
    )
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == EXPECTED
    want = fitted_example(trained_repository, "iris").predict_proba(ROWS)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want, atol=1e-5)
    assert result.get_response()["id"] == "triton-1"


def test_infer_without_requested_outputs(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)
    result = triton_client.infer("iris", [tensor])
    assert [v.decode() for v in result.as_numpy("label")] == EXPECTED


def test_errors_surface_as_client_exceptions(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(triton.InferenceServerException, match="4 features"):
        triton_client.infer("iris", [tensor])


@pytest.mark.e2e
@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("binary", [True, False])
def test_integer_labels_come_back_as_int64(
    integer_server: RunningServer, integer_repository: Path, version: str, binary: bool
) -> None:
    rows = np.resize(IRIS.data.astype(np.float32), (10_000, 4))
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=binary),
        triton.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    client = triton.InferenceServerClient(url=integer_server.url.removeprefix("http://"))
    try:
        result = client.infer("iris_int", [tensor], model_version=version, outputs=outputs)
    finally:
        client.close()
    assert result.get_output("label")["datatype"] == "INT64"
    label = result.as_numpy("label")
    assert label.dtype == np.int64
    estimator = fitted_example(integer_repository, "iris_int")
    np.testing.assert_array_equal(label, estimator.predict(rows))
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), estimator.predict_proba(rows), atol=1e-5
    )
