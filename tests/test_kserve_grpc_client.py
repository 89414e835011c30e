"""KServe's gRPC client (`kserve.InferenceGRPCClient`) works against modelserve's gRPC service.

The client covers liveness, readiness and inference; it has no metadata call, so metadata is
asked with KServe's own stubs of the protocol (`kserve.protocol.grpc`). Answers are compared with
the example model run by scikit-learn itself.
"""

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from sklearn.datasets import load_iris

from tests.reference import fitted_example
from tests.serving import RunningServer

ROWS = load_iris().data[[0, 60, 120]].astype(np.float32)


def ask(target: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """`call(client)` with a fresh client: a grpc.aio channel lives on the loop that made it."""

    async def with_client() -> Any:
        async with InferenceGRPCClient(target, retries=0, timeout=30) as client:
            return await call(client)

    return asyncio.run(with_client())


def ask_stub(target: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
    async def with_stub() -> Any:
        async with grpc.aio.insecure_channel(target) as channel:
            return await call(GRPCInferenceServiceStub(channel))

    return asyncio.run(with_stub())


def iris_request(
    binary_data: bool, version: str | None = None, model: str = "iris", rows: Any = ROWS
) -> Any:
    tensor = InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary_data)
    return InferRequest(model, [tensor], request_id="kserve-grpc-1", model_version=version)


def test_health(server: RunningServer) -> None:
    target = server.grpc_target
    assert ask(target, lambda c: c.is_server_live()) is True
    assert ask(target, lambda c: c.is_server_ready()) is True
    assert ask(target, lambda c: c.is_model_ready("iris")) is True
    assert ask(target, lambda c: c.is_model_ready("no_such_model")) is False


def test_models_that_are_not_ready(damaged_server: RunningServer) -> None:
    target = damaged_server.grpc_target
    assert ask(target, lambda c: c.is_model_ready("diabetes")) is False
    assert ask(target, lambda c: c.is_model_ready("iris")) is True


def test_metadata(server: RunningServer) -> None:
    target = server.grpc_target
    metadata = ask_stub(target, lambda s: s.ModelMetadata(pb.ModelMetadataRequest(name="iris")))
    assert (metadata.name, list(metadata.versions)) == ("iris", ["1", "2"])
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 4])
    ]
    assert [t.name for t in metadata.outputs] == ["label", "probabilities"]
    one = ask_stub(
        target, lambda s: s.ModelMetadata(pb.ModelMetadataRequest(name="iris", version="1"))
    )
    assert list(one.versions) == ["1"]
    assert ask_stub(target, lambda s: s.ServerMetadata(pb.ServerMetadataRequest())).name == (
        "modelserve"
    )


@pytest.mark.parametrize("binary_data", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize(
    ("version", "answered"),
    [(None, "2"), ("1", "1"), ("2", "2"), ("stable", "1"), ("production", "2")],
)
def test_infer_equals_the_models_own_predictions(
    server: RunningServer,
    trained_repository: Path,
    binary_data: bool,
    version: str | None,
    answered: str,
) -> None:
    result = ask(server.grpc_target, lambda c: c.infer(iris_request(binary_data, version)))
    model = fitted_example(trained_repository, "iris")
    assert (result.model_name, result.model_version, result.id) == (
        "iris",
        answered,
        "kserve-grpc-1",
    )
    # BYTES tensors come back as bytes, as from tritonclient.grpc.
    labels = [label.decode() for label in result.get_output_by_name("label").as_numpy()]
    assert labels == [str(label) for label in model.predict(ROWS)]
    probabilities = result.get_output_by_name("probabilities").as_numpy()
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, model.predict_proba(ROWS), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            iris_request(True, model="no_such_model"),
            grpc.StatusCode.NOT_FOUND,
            "model 'no_such_model' is not in the repository",
        ),
        (
            iris_request(True, version="7"),
            grpc.StatusCode.NOT_FOUND,
            "model 'iris' has no version 7",
        ),
        (
            iris_request(False, rows=np.zeros((1, 3), dtype=np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "4 features",
        ),
    ],
    ids=["unknown-model", "unknown-version", "wrong-shape"],
)
def test_errors_reach_the_caller(
    server: RunningServer, request_: Any, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        ask(server.grpc_target, lambda c: c.infer(request_))
    assert caught.value.code() is code
    assert message in str(caught.value.details())
    # The server still answers afterwards.
    assert ask(server.grpc_target, lambda c: c.is_model_ready("iris")) is True
