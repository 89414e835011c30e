"""KServe's own Python client (`kserve.InferenceRESTClient`) works against modelserve unchanged.

Its V1 liveness asks the root path, its V1 readiness reads `ready` from `GET /v1/models/{m}`, and
its V2 `infer` adds `model_name` to the request body. KServe's wire types (the pydantic models
its own server answers with) check the control-plane answers.
"""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
import numpy as np
import pytest
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.errors import UnsupportedProtocol
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest import v2_datamodels
from sklearn.datasets import load_iris

from tests.serving import RunningServer

IRIS = load_iris()
ROWS = IRIS.data[[0, 60, 120]].astype(np.float32)
EXPECTED = [str(IRIS.target_names[t]) for t in IRIS.target[[0, 60, 120]]]


def run(call: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(call)


async def with_client(protocol: str, use: Callable[[Any], Awaitable[Any]]) -> Any:
    """`use(client)` with a fresh client: each lives on the event loop of its own test."""
    async with InferenceRESTClient(RESTConfig(protocol=protocol)) as client:
        return await use(client)


def test_v1_health(server: RunningServer) -> None:
    url = server.url
    assert run(with_client("v1", lambda c: c.is_server_live(url))) is True
    assert run(with_client("v1", lambda c: c.is_model_ready(url, "iris"))) is True
    with pytest.raises(httpx.HTTPStatusError, match="'nope' is not in the repository"):
        run(with_client("v1", lambda c: c.is_model_ready(url, "nope")))
    # The client itself has no V1 server readiness; V2's /v2/health/ready is the one there is.
    with pytest.raises(UnsupportedProtocol):
        run(with_client("v1", lambda c: c.is_server_ready(url)))


def test_v2_health(server: RunningServer) -> None:
    url = server.url
    assert run(with_client("v2", lambda c: c.is_server_live(url))) is True
    assert run(with_client("v2", lambda c: c.is_server_ready(url))) is True
    assert run(with_client("v2", lambda c: c.is_model_ready(url, "iris"))) is True
    assert run(with_client("v2", lambda c: c.is_model_ready(url, "nope"))) is False


def test_models_that_are_not_ready(damaged_server: RunningServer) -> None:
    url = damaged_server.url
    for protocol in ("v1", "v2"):
        assert run(with_client(protocol, lambda c: c.is_model_ready(url, "diabetes"))) is False
        assert run(with_client(protocol, lambda c: c.is_model_ready(url, "iris"))) is True


def test_v1_predict(server: RunningServer) -> None:
    answer = run(
        with_client(
            "v1",
            lambda c: c.infer(server.url, {"instances": ROWS.tolist()}, model_name="iris"),
        )
    )
    assert answer["predictions"] == EXPECTED
    assert answer["classes"] == list(IRIS.target_names)


def iris_request(binary_inputs: bool, outputs: list[RequestedOutput] | None) -> Any:
    tensor = InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary_inputs)
    return InferRequest("iris", [tensor], request_id="kserve-1", request_outputs=outputs)


@pytest.mark.parametrize("binary_inputs", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_outputs", [False, True], ids=["json-out", "binary-out"])
def test_v2_infer(server: RunningServer, binary_inputs: bool, binary_outputs: bool) -> None:
    outputs = [
        RequestedOutput("label", {"binary_data": binary_outputs}),
        RequestedOutput("probabilities", {"binary_data": binary_outputs}),
    ]
    request = iris_request(binary_inputs, outputs)
    headers: dict[str, str] = {}
    result = run(
        with_client(
            "v2",
            lambda c: c.infer(server.url, request, model_name="iris", response_headers=headers),
        )
    )
    assert (result.model_name, result.id) == ("iris", "kserve-1")
    assert list(result.get_output_by_name("label").as_numpy()) == EXPECTED
    probabilities = result.get_output_by_name("probabilities").as_numpy()
    assert probabilities.shape == (3, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert ("inference-header-content-length" in headers) == binary_outputs


def test_v2_infer_with_every_output(server: RunningServer) -> None:
    result = run(
        with_client(
            "v2", lambda c: c.infer(server.url, iris_request(True, None), model_name="iris")
        )
    )
    assert [output.name for output in result.outputs] == ["label", "probabilities"]
    assert list(result.outputs[0].as_numpy()) == EXPECTED


def test_v2_errors_reach_the_caller(server: RunningServer) -> None:
    tensor = InferInput("input", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32), binary_data=False)
    request = InferRequest("iris", [tensor])
    with pytest.raises(httpx.HTTPStatusError, match="4 features"):
        run(with_client("v2", lambda c: c.infer(server.url, request, model_name="iris")))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/v2", v2_datamodels.ServerMetadataResponse),
        ("/v2/health/live", v2_datamodels.ServerLiveResponse),
        ("/v2/health/ready", v2_datamodels.ServerReadyResponse),
        ("/v2/models/iris", v2_datamodels.ModelMetadataResponse),
        ("/v2/models/iris/versions/1", v2_datamodels.ModelMetadataResponse),
        ("/v2/models/diabetes", v2_datamodels.ModelMetadataResponse),
        ("/v2/models/iris/ready", v2_datamodels.ModelReadyResponse),
        ("/v2/models/iris/versions/1/ready", v2_datamodels.ModelReadyResponse),
    ],
)
def test_answers_are_kserve_messages(client: httpx.Client, path: str, message: Any) -> None:
    response = client.get(path)
    assert response.status_code == 200
    message.model_validate(response.json(), strict=True)


def test_model_metadata(client: httpx.Client) -> None:
    metadata = v2_datamodels.ModelMetadataResponse.model_validate(
        client.get("/v2/models/iris").json()
    )
    assert (metadata.name, metadata.versions) == ("iris", ["1", "2"])
    assert metadata.inputs[0].model_dump() == {
        "name": "input",
        "datatype": "FP32",
        "shape": [-1, 4],
    }
    assert [o.name for o in metadata.outputs] == ["label", "probabilities"]


def test_inference_answer_is_a_kserve_message(client: httpx.Client) -> None:
    body, _ = iris_request(False, None).to_rest()
    response = client.post("/v2/models/iris/infer", json=body)
    assert response.status_code == 200, response.text
    answer = v2_datamodels.InferenceResponse.model_validate(response.json())
    assert answer.outputs[0].data == EXPECTED
